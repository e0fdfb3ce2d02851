"""The model card, `model.json`: what serving and people need to know about `model.onnx`, in one file.

Serving reads it with plain `json` (it imports no torch), so the key names are a contract: do not rename.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import onnx
import onnxruntime
import torch

from export.errors import ExportError
from export.onnx_export import OPSET
from export.verify import ParityReport
from modelcard import input_dtype
from training.checkpoint import Checkpoint

FORMAT_VERSION = 1

# The two fields that only exist once model.onnx does; the card embedded in the graph leaves them out.
_AFTER_EXPORT = ("onnx_sha256", "parity")


@dataclass(frozen=True)
class InputSpec:
    """`x`: kind "tokens" (int64 ids below `size`) or "features" (float32, `size` channels)."""

    kind: str
    size: int
    dtype: str


@dataclass(frozen=True)
class OutputSpec:
    """`y`: `size` raw logits per step; `labels[i]` names logit i."""

    size: int
    meaning: str
    labels: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """The contents of `model.json`, field for field and in the same order."""

    format_version: int = FORMAT_VERSION
    name: str
    task: str
    cell: str
    input: InputSpec
    output: OutputSpec
    vocabulary: tuple[str, ...] | None  # token models: id -> word; None for feature models
    layers: int
    hidden: int
    opset: int = OPSET
    onnx_sha256: str | None = None  # set once model.onnx exists
    parity: ParityReport | None = None  # set once verification passed
    training: dict[str, Any]
    exported_at: str
    exporter: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready nested dicts and lists."""
        return asdict(self)

    def to_json(self) -> str:
        """`model.json`'s text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def embedded_json(self) -> str:
        """The card without the fingerprint and parity: what the graph's `conveyor.card` prop holds."""
        fields = {key: value for key, value in self.to_dict().items() if key not in _AFTER_EXPORT}
        return json.dumps(fields, separators=(",", ":"))


def describe(checkpoint: Checkpoint, name: str) -> ModelCard:
    """The card for `checkpoint` exported as artifact `name`, before its fingerprint and parity exist."""
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
        input=InputSpec(config.input_kind, config.input_size, _input_dtype(config.input_kind)),
        output=OutputSpec(config.output_size, task.output_meaning, tuple(task.output_labels)),
        vocabulary=vocabulary,
        layers=config.num_layers,
        hidden=config.hidden_size,
        training=dict(checkpoint.metrics),
        exported_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        exporter={
            "torch": str(torch.__version__),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )


def _input_dtype(kind: str) -> str:
    return input_dtype(kind).name
