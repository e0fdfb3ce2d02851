"""The model card, `model.json`: what serving and people need to know about `model.onnx`, in one file.

Written by `conveyor export` (from a checkpoint or any PyTorch module) and by `conveyor card` (for an ONNX
file exported elsewhere); read by the server with plain `json`. The key names are a contract: do not rename.

Format 2 names the graph's tensors and declares the recurrent state: one entry per state tensor, each a graph
input (the state before the chunk) paired with a graph output (the state after it), its shape with the batch
axis written "batch", its dtype and its initial value. Format 1 cards (no names, no `state`) describe the
LSTM pair x, h0, c0 -> y, hn, cn of shape [layers, batch, hidden], and are read as that.

Three optional fields describe graphs exported elsewhere (silero VAD): `time_axis` false for a graph that
takes one step per run (x [batch, ...], y [batch, outputs]), `framing` for one that takes fixed windows of a
sample stream (`modelcard.framing`), and `constants`, inputs fed the same value on every run (silero's `sr`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelcard.framing import Framing

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
FORMAT_VERSION = 2
BATCH = "batch"  # how a card's state shape marks the batch axis
STATE_DTYPE = "float32"
STATE_INITIAL = "zeros"

# The two fields that only exist once model.onnx does; the card embedded in the graph leaves them out.
_AFTER_EXPORT = ("onnx_sha256", "parity")


@dataclass(frozen=True)
class StateTensor:
    """One recurrent state tensor: graph input `input` holds it before a chunk, output `output` after.

    `shape` has None at the batch axis and a fixed size everywhere else; a session's part is the rest, in C
    order.
    """

    name: str
    input: str
    output: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.input == self.output:
            raise ValueError(f"state {self.name!r}: its input and output are both named {self.input!r}")
        if self.shape.count(None) != 1:
            raise ValueError(f"state {self.name!r}: its shape {self.card_shape} needs exactly one batch axis")
        if any(size is not None and size < 1 for size in self.shape):
            raise ValueError(f"state {self.name!r}: its shape {self.card_shape} has a size below 1")

    @property
    def batch_axis(self) -> int:
        """Where the batch axis is."""
        return self.shape.index(None)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One session's part: the shape without the batch axis."""
        return tuple(size for size in self.shape if size is not None)

    @property
    def size(self) -> int:
        """Floats per session."""
        return math.prod(self.row_shape)

    @property
    def card_shape(self) -> list[int | str]:
        """The shape as the card writes it."""
        return [BATCH if size is None else size for size in self.shape]

    def to_dict(self) -> dict[str, Any]:
        """The card's entry."""
        return {
            "name": self.name,
            "input": self.input,
            "output": self.output,
            "shape": self.card_shape,
            "dtype": STATE_DTYPE,
            "initial": STATE_INITIAL,
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> StateTensor:
        """The state tensor a card's entry describes; `ValueError`/`KeyError`/`TypeError` when malformed."""
        if entry["dtype"] != STATE_DTYPE or entry["initial"] != STATE_INITIAL:
            raise ValueError(
                f"state {entry['name']!r}: only {STATE_DTYPE} states starting at zeros are served"
            )
        shape = tuple(None if size == BATCH else _size(size) for size in entry["shape"])
        return cls(str(entry["name"]), str(entry["input"]), str(entry["output"]), shape)


def recurrent_states(names: tuple[str, ...], layers: int, hidden: int) -> tuple[StateTensor, ...]:
    """A PyTorch RNN's states: each [layers, batch, hidden], named `<name>0` in and `<name>n` out."""
    return tuple(StateTensor(name, f"{name}0", f"{name}n", (layers, None, hidden)) for name in names)


CONSTANT_DTYPES = ("int64", "float32")


@dataclass(frozen=True)
class Constant:
    """A graph input fed `values` (in C order, of `shape`) on every run: a setting, not a sequence."""

    name: str
    dtype: str  # one of CONSTANT_DTYPES
    shape: tuple[int, ...]
    values: tuple[int | float, ...]

    def __post_init__(self) -> None:
        if self.dtype not in CONSTANT_DTYPES:
            raise ValueError(f"constant {self.name!r}: dtype {self.dtype!r} is not one of {CONSTANT_DTYPES}")
        if math.prod(self.shape) != len(self.values):
            raise ValueError(
                f"constant {self.name!r}: {len(self.values)} values for shape {list(self.shape)}"
            )

    def array(self) -> np.ndarray:
        """The value as the graph takes it."""
        return np.array(self.values, np.dtype(self.dtype)).reshape(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """The card's entry."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "values": list(self.values),
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Constant:
        """The constant a card's entry describes; `KeyError`/`TypeError`/`ValueError` when malformed."""
        kind = int if entry["dtype"] == "int64" else float
        values = tuple(kind(value) for value in entry["values"])
        return cls(
            str(entry["name"]), str(entry["dtype"]), tuple(_size(size) for size in entry["shape"]), values
        )


@dataclass(frozen=True)
class InputSpec:
    """The graph input `name`: kind "tokens" (int64 ids below `size`, [batch, time]) or "features"
    (float32, [batch, time, size])."""

    kind: str
    size: int
    dtype: str
    name: str = "x"


@dataclass(frozen=True)
class OutputSpec:
    """The graph output `name`: `size` raw values per step, [batch, time, size]; `labels[i]` names value i."""

    size: int
    meaning: str
    labels: tuple[str, ...]
    name: str = "y"


@dataclass(frozen=True)
class ParityCase:
    """One comparison: its name (what ran against what, at which batch size) and its differences.

    `max_abs` is the largest absolute difference. `max_scaled` is the largest |a - b| / (1 + |b|): absolute
    below magnitude 1, relative above it (numpy's allclose with atol = rtol). The check uses the scaled
    figure because a float32 logit near 200 has a spacing of 1.5e-5 between representable values: two correct
    runs that round one step apart already differ by more than an absolute 1e-5.
    """

    name: str
    max_abs: float
    max_scaled: float


@dataclass(frozen=True)
class ParityReport:
    """The figures in the card's `parity` field (no PyTorch figures for a graph exported elsewhere)."""

    ort_vs_torch_max_abs: float | None
    ort_vs_torch_max_scaled: float | None
    chunked_vs_whole_max_abs: float
    tolerance: float
    cases: tuple[ParityCase, ...]


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """The contents of `model.json`, field for field and in the same order."""

    format_version: int = FORMAT_VERSION
    name: str
    task: str
    cell: str  # "lstm", "gru", "rnn", or what the exporter of a graph of its own says
    input: InputSpec
    output: OutputSpec
    state: tuple[StateTensor, ...]
    vocabulary: tuple[str, ...] | None  # token models: id -> word; None for feature models
    layers: int | None  # None when the model is no stack of recurrent layers the card can describe
    hidden: int | None
    opset: int | None  # None when the graph was exported elsewhere
    onnx_sha256: str | None = None  # set once model.onnx exists
    parity: ParityReport | None = None  # set once verification passed
    training: dict[str, Any] = field(default_factory=dict)
    exported_at: str
    exporter: dict[str, str]
    time_axis: bool = True  # False: x [batch, ...] and y [batch, outputs], one step per run
    framing: Framing | None = None
    constants: tuple[Constant, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready nested dicts and lists (optional fields only when they say something)."""
        fields = asdict(self)
        fields["state"] = [tensor.to_dict() for tensor in self.state]
        fields["constants"] = [constant.to_dict() for constant in self.constants]
        for name, default in (("time_axis", True), ("framing", None), ("constants", [])):
            if fields[name] == default:
                del fields[name]
        return fields

    def to_json(self) -> str:
        """`model.json`'s text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def embedded_json(self) -> str:
        """The card without the fingerprint and parity: what the graph's `conveyor.card` prop holds."""
        fields = {key: value for key, value in self.to_dict().items() if key not in _AFTER_EXPORT}
        return json.dumps(fields, separators=(",", ":"))


def states_of_card(card: dict[str, Any]) -> tuple[StateTensor, ...]:
    """The state a parsed card declares (format 1: the LSTM pair of [layers, batch, hidden])."""
    if "state" not in card:
        return recurrent_states(("h", "c"), int(card["layers"]), int(card["hidden"]))
    states = tuple(StateTensor.from_dict(entry) for entry in card["state"])
    if not states:
        raise ValueError("the card declares no state: a model without state needs no Conveyor")
    names = [name for tensor in states for name in (tensor.input, tensor.output)]
    if len(set(names)) != len(names):
        raise ValueError(f"the card's state names repeat: {names}")
    return states


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"a size must be an integer (or {BATCH!r} in a state's shape), got {value!r}")
    return value


def timestamp() -> str:
    """Now, as a card writes its export time."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_artifact(out_dir: Path, onnx_bytes: bytes, card: ModelCard) -> None:
    """Write the graph and its card into `out_dir`; `OSError` when it cannot.

    The card goes first and comes back last: a crash in between never pairs a new graph with an old card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CARD_FILE).unlink(missing_ok=True)
    _write_atomically(out_dir / ONNX_FILE, onnx_bytes)
    _write_atomically(out_dir / CARD_FILE, card.to_json().encode())


def _write_atomically(path: Path, data: bytes) -> None:
    # Temp file in the same directory, then rename: readers see the old file or the whole new one, never half.
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
