"""The artifact contract between export (which writes it) and serving (which reads it), defined once.

An exported model is a directory holding `model.onnx` and its card `model.json` (`modelcard.card`). The graph
takes one input sequence and the recurrent state, and returns one output sequence and the state after it:
    x   (named by the card) int64 [batch, time] (tokens) | float32 [batch, time, features]
    y   float32 [batch, time, outputs]
    each state tensor of the card: an input before the chunk and an output after it, float32, one batch axis
(our own LSTMs: x, h0, c0 -> y, hn, cn, states [layers, batch, hidden]; a GRU or RNN has h alone). A graph
without a time axis takes one step per run (x [batch, ...] -> y [batch, outputs]); a framed one, windows of a
sample stream (`modelcard.framing`); constants are fed on every run.
This package needs neither torch nor onnxruntime, except `modelcard.graph` and `modelcard.adopt`, which run
graphs with onnxruntime: the exporter, the server and the benchmark import the rest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelcard.card import CARD_FILE, ONNX_FILE, Constant, StateTensor, states_of_card
from modelcard.framing import Framing
from modelcard.layout import StateLayout

__all__ = ["CARD_FILE", "ONNX_FILE", "ModelSpec", "StateTensor", "input_dtype", "spec_from_card"]
INPUT_KINDS = ("tokens", "features")


@dataclass(frozen=True)
class ModelSpec:
    """What a served model takes and returns: the part of its card that serving depends on."""

    name: str
    task: str
    input_kind: str  # "tokens" | "features"
    input_size: int  # vocabulary size (tokens) or feature channels (features) per step a client sends
    output_size: int
    output_meaning: str
    output_labels: tuple[str, ...]
    vocabulary: tuple[str, ...]  # empty for feature models
    layers: int  # 0 when the card does not say (a graph of a user's own)
    hidden: int
    fingerprint: str  # sha256 of model.onnx, hex
    states: tuple[StateTensor, ...]
    cell: str = "lstm"
    input_name: str = "x"
    output_name: str = "y"
    time_axis: bool = True  # False: the graph takes one step per run
    framing: Framing | None = None  # steps are samples, run as windows of them
    constants: tuple[Constant, ...] = ()

    def __post_init__(self) -> None:
        if self.framing is not None and (self.input_kind, self.input_size, self.time_axis) != (
            "features",
            1,
            False,
        ):
            raise ValueError(
                "a framed model takes samples (features of size 1) and its graph one window per run"
            )

    @functools.cached_property  # checked against every chunk
    def input_dtype(self) -> np.dtype[Any]:
        """The dtype a chunk's inputs must have."""
        return input_dtype(self.input_kind)

    @functools.cached_property
    def layout(self) -> StateLayout:
        """How a session's state row holds the state tensors."""
        return StateLayout(self.states)

    @property
    def state_size(self) -> int:
        """Floats of the graph's state per session."""
        return self.layout.size

    @property
    def session_size(self) -> int:
        """Floats a session keeps: the graph's state, then (a framed model) the samples it carries."""
        return self.layout.size + (self.framing.carry if self.framing else 0)

    @property
    def graph_input_dims(self) -> tuple[int, ...]:
        """The sizes of one step of x as the graph takes it, past batch (and time): () for token ids."""
        if self.framing is not None:
            return (self.framing.width,)
        return () if self.input_kind == "tokens" else (self.input_size,)


def input_dtype(kind: str) -> np.dtype[Any]:
    """The dtype of `x` for an input kind: int64 token ids or float32 features."""
    return np.dtype(np.int64 if kind == "tokens" else np.float32)


def spec_from_card(card: dict[str, Any]) -> ModelSpec:
    """The spec described by a parsed `model.json` (format 1 or 2); `KeyError`/`TypeError`/`ValueError` when
    malformed."""
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
        layers=int(card["layers"] or 0),
        hidden=int(card["hidden"] or 0),
        fingerprint=str(card["onnx_sha256"]),
        states=states_of_card(card),
        cell=str(card.get("cell", "lstm")),
        input_name=str(card["input"].get("name", "x")),
        output_name=str(card["output"].get("name", "y")),
        time_axis=bool(card.get("time_axis", True)),
        framing=Framing.from_dict(card["framing"]) if card.get("framing") else None,
        constants=tuple(Constant.from_dict(entry) for entry in card.get("constants", ())),
    )


def _one_of(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {allowed}")
    return str(value)
