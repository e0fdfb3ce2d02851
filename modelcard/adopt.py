"""`conveyor card MODEL.onnx`: a card for a recurrent ONNX graph exported elsewhere, once it proves that it
streams.

The graph must take one input sequence x [batch, time] (int64 tokens) or [batch, time, features] (float32)
and return one output sequence y [batch, time, outputs], with every state tensor an explicit input (before a
chunk) and output (after it), float32, with one batch axis. Which input pairs with which output is given
(`Naming.states`) or found by the usual conventions (h0 -> hn, h_in -> h_out, in_h -> out_h, ...); x and y are
then the input and output left over. Before the card is written, the graph runs in random chunks against whole
runs from random states (`modelcard.graph.check_streamable`): a model that fails is refused. No torch needed.

A graph with no time axis (x [batch, features], y [batch, outputs]) takes one step per run. One that takes
windows of a sample stream (silero VAD: [batch, 64 + 512]) is given its framing (`Naming.framing`): clients
then send samples in chunks of any size. Inputs that are settings rather than sequences (silero's `sr`) are
given values (`Naming.constants`), fed on every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard import ModelSpec, input_dtype
from modelcard.card import (
    Constant,
    InputSpec,
    ModelCard,
    OutputSpec,
    ParityReport,
    StateTensor,
    timestamp,
    write_artifact,
)
from modelcard.framing import Framing
from modelcard.graph import (
    TOLERANCE,
    Graph,
    GraphMismatchError,
    NotStreamableError,
    check_signature,
    check_streamable,
    open_session,
)

# (input, output) name patterns of a state pair: suffixes, then prefixes.
_SUFFIXES = (("0", "n"), ("_0", "_n"), ("_in", "_out"), ("in", "out"), ("_prev", "_next"))
_PREFIXES = (("in_", "out_"), ("input_", "output_"), ("initial_", "final_"), ("prev_", "next_"))


class AdoptError(ValueError):
    """The graph cannot be given a card: the message says what is wrong and what to pass."""


@dataclass(frozen=True)
class Naming:
    """What the user says about the graph's names; anything left out is found by convention."""

    input: str | None = None
    output: str | None = None
    states: tuple[tuple[str, str], ...] = ()  # (input, output) pairs
    constants: tuple[tuple[str, str], ...] = ()  # (input, value as written: "16000", "0.5,1.5")
    framing: Framing | None = None


@dataclass(frozen=True)
class Described:
    """What the card says of the model beyond its graph."""

    name: str
    task: str = "custom"
    vocabulary_size: int | None = None  # token models: ids are below it
    output_meaning: str = "model outputs"
    output_labels: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = field(default=())


def adopt(onnx_path: Path, out_dir: Path, naming: Naming, described: Described, seed: int = 0) -> ModelCard:
    """Check the graph in `onnx_path` and write it with its card into `out_dir` (model.onnx, model.json);
    returns the card. `AdoptError` saying why when the graph cannot be served."""
    onnx_bytes = _read(onnx_path)
    try:
        session = open_session(onnx_bytes)
    except Exception as exc:  # ORT raises its own exception types for a broken graph
        raise AdoptError(f"{onnx_path} does not load in ONNX Runtime: {exc}") from exc
    spec = _spec(session, naming, described, hashlib.sha256(onnx_bytes).hexdigest())
    graph = Graph(session, spec)
    try:
        check_signature(session, spec)
        cases = check_streamable(graph, np.random.default_rng(seed))
    except (GraphMismatchError, NotStreamableError) as exc:
        raise AdoptError(f"{onnx_path} cannot be served: {exc}") from exc
    except Exception as exc:  # ORT's own errors: the graph does not run as described
        raise AdoptError(f"{onnx_path} does not run as a recurrent model: {exc}") from exc
    parity = ParityReport(None, None, max(case.max_abs for case in cases), TOLERANCE, tuple(cases))
    card = _card(spec, described, parity)
    try:
        write_artifact(out_dir, onnx_bytes, card)
    except OSError as exc:
        raise AdoptError(f"cannot write to {out_dir}: {exc}") from exc
    return card


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdoptError(f"cannot read {path}: {exc.strerror}") from exc


def _spec(session: ort.InferenceSession, naming: Naming, described: Described, fingerprint: str) -> ModelSpec:
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    pairs = naming.states or _pairs_by_convention(list(inputs), list(outputs), naming)
    for state_input, state_output in pairs:
        if state_input not in inputs or state_output not in outputs:
            raise AdoptError(
                f"state {state_input}:{state_output} is not an input:output pair of the graph (inputs "
                f"{list(inputs)}, outputs {list(outputs)})"
            )
    constants = tuple(_constant(inputs, name, text) for name, text in naming.constants)
    taken = set(dict(pairs)) | {constant.name for constant in constants}
    x = _the_one("input", naming.input, [name for name in inputs if name not in taken])
    y = _the_one("output", naming.output, [name for name in outputs if name not in dict(pairs).values()])
    kind, input_size, time_axis = _input_kind(inputs[x], described.vocabulary_size, naming.framing)
    states = tuple(_state(inputs[a], outputs[b], inputs[x]) for a, b in pairs)
    shape = _Shape(x, kind, input_size, time_axis, naming.framing, constants, states)
    output_size = _output_size(session, outputs[y], y, shape)
    if described.output_labels and len(described.output_labels) != output_size:
        raise AdoptError(f"{len(described.output_labels)} output labels for {output_size} outputs")
    if described.vocabulary and len(described.vocabulary) != input_size:
        raise AdoptError(f"{len(described.vocabulary)} vocabulary words for {input_size} token ids")
    return ModelSpec(
        name=described.name,
        task=described.task,
        input_kind=kind,
        input_size=input_size,
        output_size=output_size,
        output_meaning=described.output_meaning,
        output_labels=described.output_labels,
        vocabulary=described.vocabulary,
        layers=0,
        hidden=0,
        fingerprint=fingerprint,
        states=states,
        cell="custom",
        input_name=x,
        output_name=y,
        time_axis=time_axis,
        framing=naming.framing,
        constants=constants,
    )


def _pairs_by_convention(
    inputs: list[str], outputs: list[str], naming: Naming
) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name in inputs:
        if name == naming.input:
            continue
        matches = [out for out in outputs if out != naming.output and _paired(name, out)]
        if len(matches) == 1:
            pairs.append((name, matches[0]))
    if not pairs:
        raise AdoptError(
            f"no state input pairs with an output by name (inputs {inputs}, outputs {outputs}): name them, "
            "e.g. --state h0:hn --state c0:cn"
        )
    return tuple(pairs)


def _paired(name: str, out: str) -> bool:
    for before, after in _SUFFIXES:
        if name.endswith(before) and out.endswith(after) and name[: -len(before)] == out[: -len(after)]:
            return bool(name[: -len(before)])
    return any(
        name.startswith(before) and out.startswith(after) and name[len(before) :] == out[len(after) :]
        for before, after in _PREFIXES
    )


def _the_one(kind: str, given: str | None, left: list[str]) -> str:
    if given is not None:
        if given not in left:
            raise AdoptError(
                f"--{kind} {given!r} is not one of the graph's {kind}s besides the state: {left}"
            )
        return given
    if len(left) != 1:
        constant = " and settings fed on every run with --constant NAME=VALUE" if kind == "input" else ""
        raise AdoptError(
            f"the graph has {len(left)} {kind}s besides the state ({left}): a served model takes one input "
            f"sequence and returns one output sequence; name yours with --{kind}, the state pairs with "
            f"--state IN:OUT{constant}"
        )
    return left[0]


_NUMBERS = {"tensor(int64)": ("int64", int), "tensor(float)": ("float32", float)}


def _constant(inputs: dict[str, Any], name: str, text: str) -> Constant:
    """The constant `--constant name=text` gives the graph's input `name`."""
    if name not in inputs:
        raise AdoptError(f"--constant {name}: the graph has no input {name!r} (inputs {list(inputs)})")
    arg = inputs[name]
    if arg.type not in _NUMBERS or not all(isinstance(size, int) for size in arg.shape):
        raise AdoptError(
            f"--constant {name}: input {name!r} is {arg.type} {arg.shape}; a constant is an int64 or float32 "
            "input of a fixed shape"
        )
    dtype, parse = _NUMBERS[arg.type]
    try:
        values = tuple(parse(value) for value in text.split(","))
        return Constant(name, dtype, tuple(arg.shape), values)
    except ValueError as exc:
        raise AdoptError(
            f"--constant {name}={text}: not {dtype} values for shape {arg.shape}: {exc}"
        ) from exc


def _input_kind(x: Any, vocabulary_size: int | None, framing: Framing | None) -> tuple[str, int, bool]:
    """(kind, size, whether the graph has a time axis) of the graph's input x."""
    if framing is not None:
        return _framed_input(x, framing)
    if x.type == "tensor(int64)" and len(x.shape) == 2:
        if vocabulary_size is None:
            raise AdoptError(f"{x.name!r} takes token ids (int64 [batch, time]): give --vocabulary-size")
        return "tokens", vocabulary_size, True
    if x.type == "tensor(float)" and len(x.shape) in (2, 3) and isinstance(x.shape[-1], int):
        return "features", int(x.shape[-1]), len(x.shape) == 3  # [batch, features]: one step per run
    if x.type == "tensor(float)" and len(x.shape) == 2:
        raise AdoptError(
            f"input {x.name!r} is {x.type} {x.shape}, one run of a dynamic number of values: if it takes "
            "windows of a sample stream, give them (--window SAMPLES --context SAMPLES)"
        )
    raise AdoptError(
        f"input {x.name!r} is {x.type} {x.shape}: a served model takes int64 [batch, time] token ids, "
        "float32 [batch, time, features] or [batch, features] with a fixed number of features, or float32 "
        "[batch, samples] windows of a sample stream (--window, --context)"
    )


def _framed_input(x: Any, framing: Framing) -> tuple[str, int, bool]:
    width = x.shape[-1] if x.shape else None
    if x.type != "tensor(float)" or len(x.shape) != 2 or (isinstance(width, int) and width != framing.width):
        raise AdoptError(
            f"input {x.name!r} is {x.type} {x.shape}: with --window {framing.window} --context "
            f"{framing.context} it must take float32 [batch, {framing.width}] (context, then window)"
        )
    return "features", 1, False


def _state(before: Any, after: Any, x: Any) -> StateTensor:
    if before.type != "tensor(float)" or after.type != "tensor(float)":
        raise AdoptError(f"state {before.name}:{after.name} is {before.type}: only float32 states are served")
    dynamic = [axis for axis, size in enumerate(before.shape) if not isinstance(size, int)]
    if not dynamic:
        raise AdoptError(
            f"state {before.name} is {before.shape}, with no batch axis: the graph runs one stream at a "
            "time, so sessions cannot share a run; export it with a dynamic batch axis in its state "
            "(dynamic_axes)"
        )
    if len(dynamic) > 1 and x.shape[0] in [before.shape[axis] for axis in dynamic]:
        dynamic = [axis for axis in dynamic if before.shape[axis] == x.shape[0]]  # named as x's batch
    if len(dynamic) != 1 or len(before.shape) != len(after.shape):
        raise AdoptError(
            f"state {before.name} {before.shape} -> {after.name} {after.shape}: a state needs exactly one "
            "dynamic axis, its batch, and the same shape in and out (export with dynamic_axes for the batch)"
        )
    shape = tuple(None if axis == dynamic[0] else int(size) for axis, size in enumerate(before.shape))
    name = before.name[:-1] if before.name.endswith("0") and len(before.name) > 1 else before.name
    return StateTensor(name, before.name, after.name, shape)


@dataclass(frozen=True)
class _Shape:
    """What a one-step run of the graph needs, found before its output's size is known."""

    x: str
    kind: str
    input_size: int
    time_axis: bool
    framing: Framing | None
    constants: tuple[Constant, ...]
    states: tuple[StateTensor, ...]

    def feeds(self) -> dict[str, np.ndarray]:
        """Zeros for one session's one step, and the constants."""
        step: tuple[int, ...] = (1, 1) if self.time_axis else (1,)
        if self.framing is not None:
            step += (self.framing.width,)
        elif self.kind == "features":
            step += (self.input_size,)
        feeds = {self.x: np.zeros(step, input_dtype(self.kind))}
        feeds |= {constant.name: constant.array() for constant in self.constants}
        return feeds | {
            tensor.input: np.zeros([1 if size is None else size for size in tensor.shape], np.float32)
            for tensor in self.states
        }


def _output_size(session: ort.InferenceSession, y: Any, y_name: str, shape: _Shape) -> int:
    dims = 3 if shape.time_axis else 2
    if len(y.shape) != dims:
        wanted = "[batch, time, outputs]" if shape.time_axis else "[batch, outputs] (one step per run)"
        raise AdoptError(f"output {y.name!r} is {y.shape}: a served model returns {wanted}")
    if isinstance(y.shape[-1], int):
        return int(y.shape[-1])
    try:
        (outputs,) = session.run([y_name], shape.feeds())
    except Exception as exc:
        raise AdoptError(f"a one-step run of the graph failed: {exc}") from exc
    return int(outputs.shape[-1])


def _card(spec: ModelSpec, described: Described, parity: ParityReport) -> ModelCard:
    return ModelCard(
        name=spec.name,
        task=spec.task,
        cell=spec.cell,
        input=InputSpec(spec.input_kind, spec.input_size, spec.input_dtype.name, spec.input_name),
        output=OutputSpec(spec.output_size, spec.output_meaning, spec.output_labels, spec.output_name),
        state=spec.states,
        vocabulary=described.vocabulary or None,
        layers=None,
        hidden=None,
        opset=None,
        onnx_sha256=spec.fingerprint,
        parity=parity,
        exported_at=timestamp(),
        exporter={"onnxruntime": ort.__version__, "by": "conveyor card"},
        time_axis=spec.time_axis,
        framing=spec.framing,
        constants=spec.constants,
    )
