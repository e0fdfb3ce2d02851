"""`conveyor export artifacts/<name>`: checkpoint.pt -> verified model.onnx + model.json beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.card import describe
from export.errors import ExportError
from export.module import export_verified
from export.verify import TOLERANCE
from modelcard.card import ModelCard
from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from training.tasks import UnknownTaskError, get_task

SAMPLE_SEQUENCES = 4  # task sequences verified per export: the batch > 1 case, and its first row alone


def export_artifact(directory: Path, *, tolerance: float = TOLERANCE, seed: int = 0) -> ModelCard:
    """Export the checkpoint in `directory` (an LSTM, GRU or plain RNN) to `model.onnx` and `model.json`
    there, verified; return the card.

    Raises `ExportError` when the directory or its checkpoint is missing or unreadable, or verification misses
    `tolerance`. On a failure after the checkpoint loaded, any `model.onnx` and `model.json` already in the
    directory are removed: they would describe a different model.
    """
    checkpoint = _load(directory)
    card = describe(checkpoint, directory.resolve().name)
    samples = checkpoint.samples or _task_sequences(checkpoint.task.name, seed)
    return export_verified(checkpoint.model, card, directory, samples, tolerance, seed)


def _load(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise ExportError(f"cannot export {directory}: no such directory")
    try:
        return load_checkpoint(directory)
    except CheckpointError as exc:
        raise ExportError(f"cannot export {directory}: {exc}") from exc


def _task_sequences(task_name: str, seed: int) -> list[np.ndarray]:
    try:
        task = get_task(task_name)
    except UnknownTaskError as exc:
        raise ExportError(f"cannot sample sequences of task {task_name!r} for verification: {exc}") from exc
    return task.sample_sequences(SAMPLE_SEQUENCES, np.random.default_rng(seed))
