"""A Conveyor graph run with ONNX Runtime by its card's names, and the checks every artifact passes: its
signature is the card's, and running it in chunks gives what running it whole does (it can be streamed).

Export, `conveyor card` and the server's loader all run these, so a model is held to one definition of
"streamable", whoever exported it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard import ModelSpec
from modelcard.card import ParityCase

TOLERANCE = 1e-5
_ORT_TYPES = {"tokens": "tensor(int64)", "features": "tensor(float)"}
_CONSTANT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}
_Expected = dict[str, tuple[str, tuple[int | None, ...]]]  # name -> ORT type, dims (None: dynamic)


class GraphMismatchError(ValueError):
    """The graph's inputs or outputs are not what its card says."""


class NotStreamableError(ValueError):
    """Running the graph in chunks does not give what running it whole does."""

    def __init__(self, misses: str) -> None:
        super().__init__(
            "its outputs depend on how the sequence is cut into chunks, so it cannot be streamed (a "
            "bidirectional or otherwise non-causal model, or state that is not all in its inputs and "
            f"outputs): {misses}"
        )


def open_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on one thread, for checks: they are small and share the machine."""
    options = ort.SessionOptions()
    # Errors only: graphs exported elsewhere (silero VAD's) warn of unused initializers on every load.
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


class Graph:
    """Runs `session` as the model `spec` describes: x and the state tensors in, y and the new state out.

    x is [batch, time, ...] whether or not the graph has a time axis: one without takes the steps one run
    each, its state carried from run to run (silero VAD: one window per run)."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self.session = session
        self.spec = spec
        self._outputs = [spec.output_name, *(tensor.output for tensor in spec.states)]
        self._constants = {constant.name: constant.array() for constant in spec.constants}

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        """[y [batch, time, outputs], *new states] for `x` [batch, time, ...] from `states` (the graph's
        shapes)."""
        if self.spec.time_axis:
            return self._run(x, states)
        ys = []
        for step in range(x.shape[1]):
            y, *states = self._run(x[:, step], states)
            ys.append(y)
        y = np.stack(ys, axis=1) if ys else np.zeros((len(x), 0, self.spec.output_size), np.float32)
        return [y, *states]

    def _run(self, x: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {self.spec.input_name: x} | self._constants
        feeds |= {tensor.input: state for tensor, state in zip(self.spec.states, states, strict=True)}
        results: list[np.ndarray] = self.session.run(self._outputs, feeds)
        return results

    def run_chunked(self, x: np.ndarray, states: list[np.ndarray], cuts: list[int]) -> list[np.ndarray]:
        """`run` on `x` split along time at `cuts`, the state carried from chunk to chunk as a client's is."""
        ys = []
        for chunk in np.split(x, cuts, axis=1):
            y, *states = self.run(chunk, states)
            ys.append(y)
        return [np.concatenate(ys, axis=1), *states]

    def run_framed(self, samples: np.ndarray, states: list[np.ndarray], cuts: list[int]) -> list[np.ndarray]:
        """A framed model's `run` on sample streams `samples` [batch, n] sent in chunks cut at `cuts`, each
        chunk's windows cut from the carry as the server cuts them; [y of every window, *new states]."""
        framing = self.spec.framing
        assert framing is not None
        carry, offset, ys = framing.zeros(len(samples)), 0, []
        for chunk in np.split(samples, cuts, axis=1):
            windows, carry = framing.cut(carry, np.full(len(samples), offset), chunk)
            y, *states = self.run(windows, states)
            ys.append(y)
            offset += chunk.shape[1]
        return [np.concatenate(ys, axis=1), *states]


def check_signature(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """`GraphMismatchError` naming the first input or output that is not as `spec` describes it."""
    steps: tuple[None, ...] = (None, None) if spec.time_axis else (None,)  # batch, and time if it has one
    expected_inputs: _Expected = {
        spec.input_name: (_ORT_TYPES[spec.input_kind], steps + spec.graph_input_dims)
    }
    expected_outputs: _Expected = {spec.output_name: ("tensor(float)", (*steps, spec.output_size))}
    for constant in spec.constants:
        expected_inputs[constant.name] = (_CONSTANT_TYPES[constant.dtype], constant.shape)
    for tensor in spec.states:
        expected_inputs[tensor.input] = expected_outputs[tensor.output] = ("tensor(float)", tensor.shape)
    _check_args("input", session.get_inputs(), expected_inputs)
    _check_args("output", session.get_outputs(), expected_outputs)


def _check_args(kind: str, args: list[Any], expected: _Expected) -> None:
    names = {arg.name for arg in args}
    if names != set(expected):
        raise GraphMismatchError(
            f"the graph's {kind}s are {sorted(names)}, but the card describes {sorted(expected)}"
        )
    for arg in args:
        want_type, want_dims = expected[arg.name]
        # Symbolic (str) or unknown dims are accepted where the card has a dynamic axis (batch, time).
        fixed_ok = all(
            want is None or not isinstance(dim, int) or dim == want
            for dim, want in zip(arg.shape, want_dims, strict=False)
        )
        if arg.type != want_type or len(arg.shape) != len(want_dims) or not fixed_ok:
            wanted = ["*" if dim is None else dim for dim in want_dims]
            raise GraphMismatchError(
                f"{kind} {arg.name!r} is {arg.type} {arg.shape}, but the card describes {want_type} {wanted}"
            )


def random_inputs(spec: ModelSpec, batch: int, time: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random inputs: token ids below the vocabulary size, or standard normal features."""
    if spec.input_kind == "tokens":
        return rng.integers(0, spec.input_size, size=(batch, time), dtype=np.int64)
    return rng.standard_normal((batch, time, spec.input_size), dtype=np.float32)


def random_states(spec: ModelSpec, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Non-zero states, so that the state inputs are exercised rather than multiplied away."""
    rows = 0.5 * rng.standard_normal((batch, spec.state_size), dtype=np.float32)
    return spec.layout.unpack(rows)


def compare(name: str, actual: list[np.ndarray], reference: list[np.ndarray]) -> ParityCase:
    """Differences over y and every state (NaN if any side has a NaN)."""
    pairs = list(zip(actual, reference, strict=True))
    max_abs = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    max_scaled = max(float(np.max(np.abs(a - b) / (1 + np.abs(b)))) for a, b in pairs)
    return ParityCase(name, max_abs, max_scaled)


def chunking_cases(graph: Graph, x: np.ndarray, label: str, rng: np.random.Generator) -> list[ParityCase]:
    """Chunked against whole runs of `x` from random states: three random chunkings, and one step per call
    for a single row (the streaming extreme)."""
    states = random_states(graph.spec, x.shape[0], rng)
    whole = graph.run(x, states)
    length = x.shape[1]
    chunkings = [random_cuts(length, rng) for _ in range(3)]
    if x.shape[0] == 1:
        chunkings.append(list(range(1, length)))
    return [
        compare(f"{label}: chunks {_sizes(cuts, length)} vs whole", graph.run_chunked(x, states, cuts), whole)
        for cuts in chunkings
    ]


def framed_cases(graph: Graph, rng: np.random.Generator) -> list[ParityCase]:
    """A framed graph's sample streams (batches of 1 and 3, a few windows long) sent in random chunks against
    whole, from random states, the windows cut as the server cuts them; and one sample per chunk for a single
    stream."""
    framing = graph.spec.framing
    assert framing is not None
    cases = []
    for batch in (1, 3):
        length = 3 * framing.window + framing.context + 7  # windows at several phases, and a part one
        samples = 0.1 * rng.standard_normal((batch, length), dtype=np.float32)
        states = random_states(graph.spec, batch, rng)
        whole = graph.run_framed(samples, states, [])
        chunkings = [random_cuts(length, rng) for _ in range(3)]
        if batch == 1:
            chunkings.append(list(range(1, length)))
        cases += [
            compare(
                f"samples b={batch}: chunks {_sizes(cuts, length)} vs whole",
                graph.run_framed(samples, states, cuts),
                whole,
            )
            for cuts in chunkings
        ]
    return cases


def check_streamable(
    graph: Graph, rng: np.random.Generator, tolerance: float = TOLERANCE
) -> list[ParityCase]:
    """Random inputs, batches of 1 and 3, run in random chunks and whole; `NotStreamableError` on a miss."""
    if graph.spec.framing is not None:
        cases = framed_cases(graph, rng)
    else:
        cases = [
            case
            for batch, time in ((1, 13), (3, 9))
            for case in chunking_cases(
                graph, random_inputs(graph.spec, batch, time, rng), f"random b={batch}", rng
            )
        ]
    misses = failing(cases, tolerance)
    if misses:
        raise NotStreamableError(misses)
    return cases


_LISTED = 3  # misses named in a message; the rest are counted


def failing(cases: list[ParityCase], tolerance: float) -> str:
    """The cases whose scaled difference exceeds `tolerance`, the first few listed and the rest counted; ""
    when none does."""
    # `not <=` rather than `>`, so a NaN difference is a miss too.
    misses = [case for case in cases if not case.max_scaled <= tolerance]
    listed = "; ".join(
        f"{case.name}: max |a-b|/(1+|b|) {case.max_scaled:.3g} (abs {case.max_abs:.3g})"
        for case in misses[:_LISTED]
    )
    more = len(misses) - _LISTED
    return f"{listed}; and {more} more of {len(cases)}" if more > 0 else listed


def random_cuts(length: int, rng: np.random.Generator) -> list[int]:
    """1 to 4 sorted distinct chunk boundaries inside (0, length); none when length < 2."""
    count = min(int(rng.integers(1, 5)), length - 1)
    return sorted(int(cut) for cut in rng.choice(np.arange(1, length), size=count, replace=False))


def _sizes(cuts: list[int], length: int) -> str:
    sizes = np.diff([0, *cuts, length])
    if len(sizes) > 8:  # one sample per chunk
        return f"{len(sizes)} x {int(sizes[0])}" if len(set(sizes.tolist())) == 1 else f"{len(sizes)} chunks"
    return "+".join(str(size) for size in sizes)
