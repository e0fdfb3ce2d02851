"""The ONNX Runtime `StepRunner`: loads an artifact directory, checks it against its card, runs batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnxruntime as ort

from modelcard import CARD_FILE, INPUT_NAMES, ONNX_FILE, OUTPUT_NAMES, ModelSpec, spec_from_card
from serving.domain.errors import ModelLoadError
from serving.domain.runner import Arrays

_X, _H, _C = INPUT_NAMES


class OnnxStepRunner:
    """Owns one `onnxruntime.InferenceSession`, validated and warmed up before it serves."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self._session = session
        self.spec = spec
        self._outputs = list(OUTPUT_NAMES)

    @classmethod
    def load(cls, model_dir: Path, *, intra_op_threads: int = 1) -> Self:
        """Load `model_dir`'s model.onnx + model.json, verify the fingerprint and signature, and warm up.

        Raises `ModelLoadError` with a message fit to print when the server must refuse to start.
        """
        onnx_bytes, card = _read_artifact(model_dir)
        try:
            spec = spec_from_card(card)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"corrupt model: {CARD_FILE} in {model_dir} is not a model card: {exc!r}"
            ) from exc
        if hashlib.sha256(onnx_bytes).hexdigest() != spec.fingerprint:
            raise ModelLoadError(
                f"{CARD_FILE} fingerprint does not match {ONNX_FILE} in {model_dir}: run conveyor export"
            )
        runner = cls(_open_session(onnx_bytes, model_dir, intra_op_threads), spec)
        _check_signature(runner._session, spec)
        runner._warm_up()
        return runner

    def run(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Arrays:
        """One ORT call for the whole batch; ORT reads contiguous numpy inputs in place, without a copy."""
        y, hn, cn = self._session.run(self._outputs, {_X: x, _H: h, _C: c})
        return y, hn, cn

    def _warm_up(self) -> None:
        # The first run allocates ORT's buffers and plans its kernels; do it before health says SERVING.
        spec = self.spec
        x_shape = (1, 1) if spec.input_kind == "tokens" else (1, 1, spec.input_size)
        state = np.zeros((spec.layers, 1, spec.hidden), np.float32)
        try:
            y, hn, _ = self.run(np.zeros(x_shape, spec.input_dtype), state, state)
        except Exception as exc:
            raise ModelLoadError(f"corrupt model: the warm-up run failed: {exc}") from exc
        if y.shape != (1, 1, spec.output_size) or hn.shape != state.shape:
            raise ModelLoadError(
                f"corrupt model: a one-step run gave y {list(y.shape)} and hn {list(hn.shape)}, "
                f"expected {[1, 1, spec.output_size]} and {list(state.shape)}"
            )


def _read_artifact(model_dir: Path) -> tuple[bytes, dict[str, Any]]:
    onnx_path, card_path = model_dir / ONNX_FILE, model_dir / CARD_FILE
    for path in (onnx_path, card_path):
        if not path.is_file():
            raise ModelLoadError(f"no {path.name} in {model_dir}: run conveyor export")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"corrupt model: {card_path} is not readable JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelLoadError(f"corrupt model: {card_path} holds a {type(card).__name__}, not a model card")
    # One read serves both the fingerprint and ORT, so the bytes checked are the bytes served.
    return onnx_path.read_bytes(), card


def _open_session(onnx_bytes: bytes, model_dir: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The graph is one chain (encoder -> LSTM -> head): running nodes in parallel gains nothing.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    # Parallelism comes from batching sessions into one call, so one thread per call is the default; more
    # threads only pay for large batches of large models.
    options.intra_op_num_threads = intra_op_threads
    # Idle pool threads would otherwise spin-wait between batches and take CPU from the event loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for a broken graph
        raise ModelLoadError(f"corrupt model: {model_dir / ONNX_FILE} does not load: {exc}") from exc


def _check_signature(session: ort.InferenceSession, spec: ModelSpec) -> None:
    x_type, x_dims = (
        ("tensor(int64)", (None, None))
        if spec.input_kind == "tokens"
        else ("tensor(float)", (None, None, spec.input_size))
    )
    state = ("tensor(float)", (spec.layers, None, spec.hidden))
    (x, *state_inputs), (y, *state_outputs) = INPUT_NAMES, OUTPUT_NAMES
    expected: dict[str, tuple[str, tuple[int | None, ...]]] = {
        x: (x_type, x_dims),
        y: ("tensor(float)", (None, None, spec.output_size)),
    }
    expected |= {name: state for name in (*state_inputs, *state_outputs)}
    _check_names("inputs", [arg.name for arg in session.get_inputs()], INPUT_NAMES)
    _check_names("outputs", [arg.name for arg in session.get_outputs()], OUTPUT_NAMES)
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        _check_arg(arg.name, arg.type, arg.shape, *expected[arg.name])


def _check_names(kind: str, names: list[str], expected: tuple[str, ...]) -> None:
    if tuple(names) != expected:
        raise ModelLoadError(f"corrupt model: the graph's {kind} are {names}, expected {list(expected)}")


def _check_arg(
    name: str, type_: str, shape: list[Any], want_type: str, want_dims: tuple[int | None, ...]
) -> None:
    # Symbolic (str) or unknown dims are accepted: the batch and time axes are dynamic by design.
    fixed_ok = all(
        want is None or not isinstance(dim, int) or dim == want
        for dim, want in zip(shape, want_dims, strict=False)
    )
    if type_ != want_type or len(shape) != len(want_dims) or not fixed_ok:
        wanted = ["*" if dim is None else dim for dim in want_dims]
        raise ModelLoadError(
            f"corrupt model: {name!r} is {type_} {shape}, but model.json describes {want_type} {wanted}"
        )
