"""The artifact contract between export (which writes it) and serving (which reads it), defined once.

An exported model is a directory holding `model.onnx` and its card `model.json`. The graph's inputs are
`x`, `h0`, `c0` and its outputs `y`, `hn`, `cn`:
    x   int64 [batch, time] (tokens) | float32 [batch, time, features]
    h0, c0, hn, cn  float32 [layers, batch, hidden]
    y   float32 [batch, time, outputs]
This module needs neither torch nor onnxruntime: the exporter, the server and the benchmark all import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
INPUT_NAMES = ("x", "h0", "c0")
OUTPUT_NAMES = ("y", "hn", "cn")
INPUT_KINDS = ("tokens", "features")


@dataclass(frozen=True)
class ModelSpec:
    """What a served model takes and returns: the part of its card that serving depends on."""

    name: str
    task: str
    input_kind: str  # "tokens" | "features"
    input_size: int  # vocabulary size (tokens) or feature channels (features)
    output_size: int
    output_meaning: str
    output_labels: tuple[str, ...]
    vocabulary: tuple[str, ...]  # empty for feature models
    layers: int
    hidden: int
    fingerprint: str  # sha256 of model.onnx, hex

    @functools.cached_property  # checked against every chunk
    def input_dtype(self) -> np.dtype[Any]:
        """The dtype a chunk's inputs must have."""
        return input_dtype(self.input_kind)


def input_dtype(kind: str) -> np.dtype[Any]:
    """The dtype of `x` for an input kind: int64 token ids or float32 features."""
    return np.dtype(np.int64 if kind == "tokens" else np.float32)


def spec_from_card(card: dict[str, Any]) -> ModelSpec:
    """The spec described by a parsed `model.json`; `KeyError`/`TypeError`/`ValueError` when malformed."""
    vocabulary = card["vocabulary"] or ()
    return ModelSpec(
        name=str(card["name"]),
        task=str(card["task"]),
        input_kind=_one_of(card["input"]["kind"], INPUT_KINDS),
        input_size=int(card["input"]["size"]),
        output_size=int(card["output"]["size"]),
        output_meaning=str(card["output"]["meaning"]),
        output_labels=tuple(str(label) for label in card["output"]["labels"]),
        vocabulary=tuple(str(word) for word in vocabulary),
        layers=int(card["layers"]),
        hidden=int(card["hidden"]),
        fingerprint=str(card["onnx_sha256"]),
    )


def _one_of(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {allowed}")
    return str(value)
