"""A task made of the user's own sequences (`conveyor train --data FILE`), read by `training.data`.

Classification or regression, one target per sequence or one per step, sequences of any lengths. Batches
are sequences drawn from the training split, padded at the end: the model is causal, so the padding never
touches a real step's output, and its steps weigh nothing. A per-sequence target is trained at the last step
(`answer="last"`) or at every step (`"every"`: the model then answers as the sequence arrives, and the
answer firms up); either way it is scored at the last step. The input normalization (mean and scale per
channel) is fitted on the training split and becomes part of the model, so the exported graph applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from training.checkpoint import TaskInfo
from training.data import Objective, SequenceData
from training.loop import r_squared
from training.model import ModelConfig, SequenceModel
from training.tasks.base import Batch

Answer = Literal["last", "every"]
FRACTIONS = tuple(round(0.1 * k, 1) for k in range(1, 11))  # of each sequence seen, for the firming-up curve


class DataTaskError(ValueError):
    """Data that cannot be trained as asked (too few sequences to split, a test file of another shape)."""


@dataclass(frozen=True)
class DataTaskConfig:
    """How the user's data is split, trained and scored."""

    source: str  # the training file, as given
    objective: Objective = "classification"
    answer: Answer = "last"
    validation_fraction: float = 0.2  # of the training file's sequences, held out for early stopping
    test_source: str | None = None  # the file the headline figures come from (else the validation split)


@dataclass(frozen=True)
class _Split:
    sequences: list[np.ndarray]
    targets: list[np.ndarray]


class DataTask:
    """The user's sequences as a `Task`."""

    name = "data"
    curriculum = False  # a file has one difficulty

    def __init__(
        self, data: SequenceData, config: DataTaskConfig, rng: np.random.Generator, test: SequenceData | None
    ) -> None:
        self.config, self.data = config, data
        self._train, self._validation = _split(data, config.validation_fraction, rng)
        self._test = None if test is None else _check_like(test, data)
        self._mean, self._scale = _normalization(self._train.sequences)

    def info(self) -> TaskInfo:
        """Class names, or the regression targets' names; no vocabulary."""
        if self.config.objective == "regression":
            names = self.data.target_names
            return TaskInfo(self.name, None, names, f"predicted {', '.join(names)} from {self.config.source}")
        assert self.data.classes is not None
        target = self.data.target_names[0]
        return TaskInfo(self.name, None, self.data.classes, f"{target} logits, one per class")

    def default_model_config(self) -> ModelConfig:
        """An LSTM over the file's feature channels, normalized by the training split's statistics."""
        outputs = len(self.info().output_labels)
        return ModelConfig(
            "features",
            len(self.data.feature_names),
            outputs,
            hidden_size=64,
            embed_size=32,
            objective=self.config.objective,
            input_mean=self._mean,
            input_scale=self._scale,
        )

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        """Sequences of the training split drawn at random (`difficulty` has no meaning here)."""
        return self._batch(self._train, rng.integers(0, len(self._train.sequences), batch_size))

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Sequences of the validation split drawn at random."""
        return self._batch(self._validation, rng.integers(0, len(self._validation.sequences), batch_size))

    def evaluate(self, model: SequenceModel, rng: np.random.Generator) -> dict[str, float]:
        """On the test file (or the validation split): the headline figure at each sequence's last step and,
        per-sequence classification, the accuracy after each tenth of the sequence."""
        split = self._test or self._validation
        y = _outputs(model, self._batch(split, np.arange(len(split.sequences))))
        lengths = np.array([len(s) for s in split.sequences])
        prefix = self._headline_prefix()
        if self.config.objective == "regression":
            return _regression_figures(prefix, y, split, lengths, self.data.per_step)
        return _classification_figures(prefix, y, split, lengths, self.data.per_step)

    def headline_metric(self) -> str:
        """Accuracy (classification) or R^2 (regression) on the test file, else on the validation split."""
        return f"{self._headline_prefix()}_{'r2' if self.config.objective == 'regression' else 'accuracy'}"

    def sample_sequences(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Real sequences of the validation split, as a client would send them (not normalized)."""
        chosen = rng.choice(len(self._validation.sequences), size=min(n, len(self._validation.sequences)))
        return [self._validation.sequences[i].copy() for i in chosen]

    def _headline_prefix(self) -> str:
        return "test" if self._test is not None else "validation"

    def _batch(self, split: _Split, rows: np.ndarray) -> Batch:
        sequences = [split.sequences[i] for i in rows]
        targets = [split.targets[i] for i in rows]
        lengths = np.array([len(s) for s in sequences])
        steps, features = int(lengths.max()), sequences[0].shape[1]
        x = np.zeros((len(rows), steps, features), np.float32)
        valid = np.arange(steps)[None, :] < lengths[:, None]  # (B, T)
        last = np.zeros_like(valid)
        last[np.arange(len(rows)), lengths - 1] = True
        for row, sequence in enumerate(sequences):
            x[row, : len(sequence)] = sequence
        y = _padded_targets(targets, lengths, steps, self.config.objective)
        per_sequence = not self.data.per_step
        trained = last if per_sequence and self.config.answer == "last" else valid
        scored = last if per_sequence else valid
        return Batch(
            torch.from_numpy(x),
            torch.from_numpy(y),
            torch.from_numpy(trained.astype(np.float32)),
            torch.from_numpy(scored),
        )


def _split(data: SequenceData, fraction: float, rng: np.random.Generator) -> tuple[_Split, _Split]:
    count = len(data.sequences)
    held = max(1, math.floor(count * fraction))
    if count - held < 1:
        raise DataTaskError(
            f"{count} sequence(s) cannot be split into training and validation: need at least 2"
        )
    order = rng.permutation(count)

    def part(indices: np.ndarray) -> _Split:
        return _Split([data.sequences[i] for i in indices], [data.targets[i] for i in indices])

    return part(order[held:]), part(order[:held])


def _check_like(test: SequenceData, data: SequenceData) -> _Split:
    if test.feature_names != data.feature_names:
        raise DataTaskError(
            f"the test file's features are {test.feature_names}, the training file's {data.feature_names}"
        )
    if test.per_step != data.per_step:
        raise DataTaskError("the test file's targets are per step where the training file's are not, or back")
    if data.classes is not None:
        unknown = sorted(set(test.classes or ()) - set(data.classes))
        if unknown:
            raise DataTaskError(f"the test file has classes the training file has not: {unknown}")
        # Re-index the test targets into the training file's classes (the test file may lack some).
        assert test.classes is not None
        index = np.array([data.classes.index(name) for name in test.classes])
        return _Split(test.sequences, [index[t] for t in test.targets])
    return _Split(test.sequences, test.targets)


def _normalization(sequences: list[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    steps = np.concatenate(sequences).astype(np.float64)
    mean, scale = steps.mean(axis=0), steps.std(axis=0)
    scale[scale < 1e-8] = 1.0  # a constant channel is left as it is, not divided by zero
    return tuple(mean.tolist()), tuple(scale.tolist())


def _padded_targets(
    targets: list[np.ndarray], lengths: np.ndarray, steps: int, objective: Objective
) -> np.ndarray:
    """(B, T) class indices or (B, T, K) values; a per-sequence target repeated along its sequence."""
    if objective == "regression":
        width = targets[0].shape[-1]
        y = np.zeros((len(targets), steps, width), np.float32)
    else:
        y = np.zeros((len(targets), steps), np.int64)
    for row, (target, length) in enumerate(zip(targets, lengths, strict=True)):
        y[row, :length] = target if len(target) == length else target[0]
    return y


@torch.no_grad()
def _outputs(model: SequenceModel, batch: Batch) -> np.ndarray:
    model.eval()
    y, _ = model(batch.x, model.init_state(batch.x.shape[0]))
    outputs: np.ndarray = y.numpy()
    return outputs


def _classification_figures(
    prefix: str, y: np.ndarray, split: _Split, lengths: np.ndarray, per_step: bool
) -> dict[str, float]:
    predicted = y.argmax(axis=-1)  # (B, T)
    rows = np.arange(len(lengths))
    if per_step:
        hits = [np.mean(predicted[i, :n] == split.targets[i]) for i, n in enumerate(lengths)]
        return {f"{prefix}_accuracy": float(np.mean(hits))}
    labels = np.array([int(t[0]) for t in split.targets])
    figures = {f"{prefix}_accuracy": float(np.mean(predicted[rows, lengths - 1] == labels))}
    for fraction in FRACTIONS:
        seen = np.maximum(1, np.ceil(fraction * lengths).astype(int))
        figures[f"{prefix}_accuracy_at_{round(fraction * 100)}pct"] = float(
            np.mean(predicted[rows, seen - 1] == labels)
        )
    return figures


def _regression_figures(
    prefix: str, y: np.ndarray, split: _Split, lengths: np.ndarray, per_step: bool
) -> dict[str, float]:
    if per_step:
        predicted = np.concatenate([y[i, :n] for i, n in enumerate(lengths)])
        actual = np.concatenate(split.targets)
    else:
        predicted = y[np.arange(len(lengths)), lengths - 1]
        actual = np.stack([t[0] for t in split.targets])
    return {
        f"{prefix}_mse": float(((predicted - actual) ** 2).mean()),
        f"{prefix}_r2": r_squared(torch.from_numpy(predicted), torch.from_numpy(actual)),
    }
