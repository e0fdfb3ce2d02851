"""The card of a model exported here (`modelcard.card` defines it): from a checkpoint, or from a module of the
user's own, before its fingerprint and parity exist."""

from __future__ import annotations

import json

import onnx
import onnxruntime
import torch

from export.errors import ExportError
from modelcard import input_dtype
from modelcard.card import InputSpec, ModelCard, OutputSpec, recurrent_states, timestamp
from training.checkpoint import Checkpoint
from training.model import STATE_NAMES

OPSET = 17


def describe(checkpoint: Checkpoint, name: str) -> ModelCard:
    """The card for `checkpoint` exported as artifact `name`."""
    config, task = checkpoint.config, checkpoint.task
    try:
        json.dumps(checkpoint.metrics)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"the checkpoint's training metrics are not plain JSON values: {exc}") from exc
    vocabulary = tuple(task.vocabulary) if task.vocabulary is not None else None
    return ModelCard(
        name=name,
        task=task.name,
        cell=config.cell,
        input=input_spec(config.input_kind, config.input_size),
        output=OutputSpec(config.output_size, task.output_meaning, tuple(task.output_labels)),
        state=recurrent_states(STATE_NAMES[config.cell], config.num_layers, config.hidden_size),
        vocabulary=vocabulary,
        layers=config.num_layers,
        hidden=config.hidden_size,
        opset=OPSET,
        training=dict(checkpoint.metrics),
        exported_at=timestamp(),
        exporter=exporter_versions(),
    )


def input_spec(kind: str, size: int, name: str = "x") -> InputSpec:
    """The card's input entry for `kind` ("tokens" | "features") and `size`."""
    return InputSpec(kind, size, input_dtype(kind).name, name)


def exporter_versions() -> dict[str, str]:
    """The versions of what exported and verified the graph."""
    return {"torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
