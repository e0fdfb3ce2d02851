"""`conveyor export artifacts/<name>`: checkpoint.pt -> verified model.onnx + model.json beside it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.card import ModelCard, describe
from export.errors import ExportError
from export.onnx_export import to_onnx
from export.verify import TOLERANCE, verify_parity
from modelcard import CARD_FILE, ONNX_FILE
from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from training.tasks import UnknownTaskError, get_task

SAMPLE_SEQUENCES = 4  # task sequences verified per export: the batch > 1 case, and its first row alone


def export_artifact(directory: Path, *, tolerance: float = TOLERANCE, seed: int = 0) -> ModelCard:
    """Export the checkpoint in `directory` to `model.onnx` and `model.json` there, verified; return the card.

    Raises `ExportError` when the directory or its checkpoint is missing or unreadable, the model is not an
    LSTM, or verification misses `tolerance`. On a failure after the checkpoint loaded, any `model.onnx` and
    `model.json` already in the directory are removed: they would describe a different model.
    """
    checkpoint = _load(directory)
    try:
        return _export(directory, checkpoint, tolerance, seed)
    except ExportError as exc:
        _remove_outputs(directory)
        raise ExportError(f"cannot export {directory}: {exc}") from exc


def _load(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise ExportError(f"cannot export {directory}: no such directory")
    try:
        return load_checkpoint(directory)
    except CheckpointError as exc:
        raise ExportError(f"cannot export {directory}: {exc}") from exc


def _export(directory: Path, checkpoint: Checkpoint, tolerance: float, seed: int) -> ModelCard:
    if checkpoint.config.cell != "lstm":
        # GRU and plain-RNN checkpoints exist for the gap-sweep experiment; serving runs LSTMs only.
        raise ExportError(
            f"only LSTM models are exported; this checkpoint holds a {checkpoint.config.cell!r} model"
        )
    card = describe(checkpoint, directory.resolve().name)
    metadata = {
        "conveyor.name": card.name,
        "conveyor.task": card.task,
        "conveyor.input_kind": card.input.kind,
        "conveyor.card": card.embedded_json(),
    }
    onnx_bytes = to_onnx(checkpoint.model, metadata).SerializeToString()
    sequences = _task_sequences(checkpoint.task.name, seed)
    parity = verify_parity(checkpoint.model, onnx_bytes, sequences, tolerance, seed)
    card = replace(card, onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(), parity=parity)
    # The card goes first and comes back last: a crash in between never pairs a new graph with an old card.
    (directory / CARD_FILE).unlink(missing_ok=True)
    _write_atomically(directory / ONNX_FILE, onnx_bytes)
    _write_atomically(directory / CARD_FILE, card.to_json().encode())
    return card


def _task_sequences(task_name: str, seed: int) -> list[np.ndarray]:
    try:
        task = get_task(task_name)
    except UnknownTaskError as exc:
        raise ExportError(f"cannot sample sequences of task {task_name!r} for verification: {exc}") from exc
    return task.sample_sequences(SAMPLE_SEQUENCES, np.random.default_rng(seed))


def _write_atomically(path: Path, data: bytes) -> None:
    # Temp file in the same directory, then rename: readers see the old file or the whole new one, never half.
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path.name}: {exc}") from exc


def _remove_outputs(directory: Path) -> None:
    for name in (CARD_FILE, ONNX_FILE):
        (directory / name).unlink(missing_ok=True)
