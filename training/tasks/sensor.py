"""A multichannel sensor stream whose operating mode is announced once and must be remembered.

Channel 0 is a command bus: a mode change is a three-step burst at a level that encodes the new mode; the bus
also carries single-step glitches of random height that mean nothing. Channels 1.. are sensors: AR(1) noise
around levels that jump at every mode change and at random other times, in the same way whatever the mode. So
a change is visible in the sensors, but which mode it is can only be read from the burst, possibly hundreds of
steps back. The target at every step is the current mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.checkpoint import TaskInfo
from training.model import ModelConfig, SequenceModel
from training.tasks.base import Batch, scored_accuracy

MODES = ("idle", "low", "medium", "high")


@dataclass(frozen=True)
class SensorTaskConfig:
    """Signal shape, curriculum and evaluation grid of the sensor task (lengths in steps)."""

    sensor_channels: int = 5
    burst_steps: int = 3
    bus_noise_std: float = 0.3
    glitch_rate_per_step: float = 0.02
    sensor_ar_coefficient: float = 0.9
    sensor_noise_std: float = 0.3
    level_jump_rate_per_step: float = 0.01
    min_segment_steps: int = 20
    start_max_segment_steps: int = 40
    train_max_segment_steps: int = 200  # evaluation goes beyond
    eval_max_segment_steps: int = 400
    eval_since_buckets_steps: tuple[tuple[int, int], ...] = ((0, 100), (100, 200), (200, 400))
    eval_streams: int = 200


@dataclass(frozen=True)
class _Streams:
    x: np.ndarray  # float32 (B, T, F)
    modes: np.ndarray  # int64 (B, T)
    since_burst: np.ndarray  # int64 (B, T): steps since the current mode's burst ended (-1 inside a burst)


class SensorTask:
    """Per-step classification of the current operating mode from a noisy multichannel stream."""

    name = "sensor"
    curriculum = True

    def __init__(self, config: SensorTaskConfig | None = None) -> None:
        self.config = config or SensorTaskConfig()

    def info(self) -> TaskInfo:
        """No vocabulary; one logit per mode."""
        return TaskInfo(self.name, None, list(MODES), "current operating mode logits, one per mode")

    def default_model_config(self) -> ModelConfig:
        """A small LSTM over the bus and sensor channels."""
        return ModelConfig(
            "features", 1 + self.config.sensor_channels, len(MODES), hidden_size=64, embed_size=32
        )

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        """Streams whose longest segment grows with `difficulty` up to the training maximum."""
        c = self.config
        span = c.train_max_segment_steps - c.start_max_segment_steps
        max_segment = c.start_max_segment_steps + round(difficulty * span)
        return self._batch(self._streams(batch_size, 2 * max_segment, max_segment, rng))

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Streams at full training difficulty."""
        c = self.config
        return self._batch(
            self._streams(batch_size, 2 * c.train_max_segment_steps, c.train_max_segment_steps, rng)
        )

    def evaluate(self, model: SequenceModel, rng: np.random.Generator) -> dict[str, float]:
        """Mode accuracy on longer segments than training saw, overall and by steps since the last burst."""
        c = self.config
        streams = self._streams(c.eval_streams, 2 * c.eval_max_segment_steps, c.eval_max_segment_steps, rng)
        batch = self._batch(streams)
        metrics = {"mode_acc": scored_accuracy(model, batch)}
        for lo, hi in c.eval_since_buckets_steps:
            in_bucket = (streams.since_burst >= lo) & (streams.since_burst < hi)
            metrics[f"mode_acc_since_{lo}_{hi}"] = scored_accuracy(model, self._batch(streams, in_bucket))
        return metrics

    def headline_metric(self) -> str:
        """Per-step mode accuracy over held-out streams."""
        return "mode_acc"

    def sample_sequences(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Held-out streams of varied lengths at training difficulty."""
        c = self.config
        lengths = rng.integers(c.min_segment_steps, 2 * c.train_max_segment_steps, size=n)
        streams = self._streams(n, int(lengths.max()), c.train_max_segment_steps, rng)
        return [streams.x[i, :length].copy() for i, length in enumerate(lengths)]

    def _batch(self, streams: _Streams, scored: np.ndarray | None = None) -> Batch:
        # Steps inside a burst are not scored: the mode is still being announced.
        labelled = streams.since_burst >= 0
        scored = labelled if scored is None else scored & labelled
        return Batch(
            torch.from_numpy(streams.x),
            torch.from_numpy(streams.modes),
            torch.from_numpy(labelled.astype(np.float32)),
            torch.from_numpy(scored),
        )

    def _streams(self, batch: int, length: int, max_segment: int, rng: np.random.Generator) -> _Streams:
        modes, since = self._schedule(batch, length, max_segment, rng)
        bus = self._bus(modes, since, rng)
        sensors = self._sensors(since, rng)
        x = np.concatenate([bus[..., None], sensors], axis=-1).astype(np.float32)  # (B, T, F)
        return _Streams(x, modes, since)

    def _schedule(
        self, batch: int, length: int, max_segment: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mode per step and steps since the burst ended: segments of random length, each a different mode."""
        modes = np.empty((batch, length), dtype=np.int64)
        since = np.empty((batch, length), dtype=np.int64)
        burst = self.config.burst_steps
        for row in range(batch):
            t, mode = 0, int(rng.integers(len(MODES)))
            while t < length:
                segment = int(rng.integers(self.config.min_segment_steps, max_segment + 1))
                end = min(length, t + segment)
                modes[row, t:end] = mode
                since[row, t:end] = np.arange(end - t) - burst
                since[row, t : min(end, t + burst)] = -1
                t = end
                mode = (mode + int(rng.integers(1, len(MODES)))) % len(MODES)  # always a different mode
        return modes, since

    def _bus(self, modes: np.ndarray, since: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        bus = rng.normal(0.0, c.bus_noise_std, size=modes.shape)
        glitch = rng.random(modes.shape) < c.glitch_rate_per_step
        bus[glitch] += rng.uniform(0.5, len(MODES) + 0.5, size=int(glitch.sum()))
        in_burst = since < 0
        bus[in_burst] += modes[in_burst] + 1.0  # burst level 1..4 encodes the mode
        return bus

    def _sensors(self, since: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        batch, length = since.shape
        jumps = (since == -1) | (rng.random((batch, length)) < c.level_jump_rate_per_step)
        noise = rng.normal(0.0, c.sensor_noise_std, size=(batch, length, c.sensor_channels))
        new_levels = rng.normal(0.0, 1.0, size=(batch, length, c.sensor_channels))
        level = np.zeros((batch, c.sensor_channels))
        ar = np.zeros((batch, c.sensor_channels))
        out = np.empty((batch, length, c.sensor_channels))
        for t in range(length):
            level = np.where(jumps[:, t, None], new_levels[:, t], level)
            ar = c.sensor_ar_coefficient * ar + noise[:, t]
            out[:, t] = level + ar
        return out
