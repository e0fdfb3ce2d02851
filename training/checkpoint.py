"""The checkpoint: one self-describing file from which export rebuilds the model without training flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.model import ModelConfig, SequenceModel

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint is missing or unreadable; the message says which directory and what to do."""


@dataclass(frozen=True)
class TaskInfo:
    """What the model's inputs and outputs mean, so that later stages need no task code."""

    name: str  # "language" | "sensor"
    vocabulary: list[str] | None  # token models: index -> word; None for feature models
    output_labels: list[str]  # meaning of each logit: the vocabulary for the LM, class names for sensor
    output_meaning: str  # one line, e.g. "next-word logits over the vocabulary"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (weights loaded, eval mode) and what describes it."""

    model: SequenceModel
    config: ModelConfig
    task: TaskInfo
    step: int
    metrics: dict[str, Any]
    # Real inputs of the task ([T] ids or [T, F] features), which export verifies the graph on; empty in
    # checkpoints written before they were kept (export then samples the task again).
    samples: list[np.ndarray]


def save_checkpoint(
    directory: Path,
    model: SequenceModel,
    config: ModelConfig,
    task: TaskInfo,
    step: int,
    metrics: dict[str, Any],
    samples: Sequence[np.ndarray] = (),
) -> Path:
    """Write `directory/checkpoint.pt` (creating the directory) and return its path; `samples`: real inputs
    for export to verify the graph on."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    payload = {
        "model": model.state_dict(),
        "config": asdict(config),
        "task": asdict(task),
        "step": step,
        "metrics": metrics,
        "samples": [torch.from_numpy(np.ascontiguousarray(sample)) for sample in samples],
    }
    # Write then rename, so an interrupted save never leaves a truncated checkpoint behind.
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(directory: Path) -> Checkpoint:
    """Load `directory/checkpoint.pt`; any failure raises `CheckpointError` with a readable message."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CHECKPOINT_FILE} in {directory} (train first: conveyor train ...)")
    try:
        # weights_only: a checkpoint is data, never code to run.
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return _from_payload(payload)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{CHECKPOINT_FILE} in {directory} is corrupt or not a Conveyor checkpoint: {exc}"
        ) from exc


def _from_payload(payload: Any) -> Checkpoint:
    if not isinstance(payload, dict):
        raise TypeError(f"expected a dict, found {type(payload).__name__}")
    missing = {"model", "config", "task", "step", "metrics"} - payload.keys()
    if missing:
        raise KeyError(f"missing keys {sorted(missing)}")
    config = ModelConfig(**_as_dict(ModelConfig, payload["config"]))
    task = TaskInfo(**_as_dict(TaskInfo, payload["task"]))
    model = SequenceModel(config)
    model.load_state_dict(payload["model"])  # strict: a mismatch is an error, not a partial load
    model.eval()
    samples = [tensor.numpy() for tensor in payload.get("samples", [])]
    return Checkpoint(model, config, task, int(payload["step"]), dict(payload["metrics"]), samples)


def _as_dict(cls: type, values: Any) -> dict[str, Any]:
    # A missing or unknown field then fails in the dataclass constructor with a message naming it.
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} must be a dict, found {type(values).__name__}")
    return values
