"""The ONNX Runtime `StepRunner`: loads an artifact directory, checks it against its card (fingerprint,
signature, and that it streams), runs batches."""

from __future__ import annotations

import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnxruntime as ort

from modelcard import CARD_FILE, ONNX_FILE, ModelSpec, spec_from_card
from modelcard.graph import Graph, GraphMismatchError, NotStreamableError, check_signature, check_streamable
from serving.domain.errors import ModelLoadError
from serving.domain.runner import Arrays

# A batch smaller than this runs as one call whatever `parallel_calls` says: halves of a small batch gain
# less than the hand-off to another thread costs.
MIN_SPLIT_ROWS = 32


class OnnxStepRunner:
    """Owns one `onnxruntime.InferenceSession`, validated and warmed up before it serves."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, parallel_calls: int = 1) -> None:
        self._graph = Graph(session, spec)
        self.spec = spec
        self._parallel_calls = parallel_calls
        # The calling thread runs the first part; ORT releases the GIL, so the others run beside it.
        self._helpers = ThreadPoolExecutor(parallel_calls - 1) if parallel_calls > 1 else None

    @classmethod
    def load(cls, model_dir: Path, *, intra_op_threads: int = 1, parallel_calls: int = 1) -> Self:
        """Load `model_dir`'s model.onnx + model.json, verify the fingerprint and signature, and warm up.
        `parallel_calls`: a batch of at least MIN_SPLIT_ROWS rows runs as that many calls at once, each on
        its part of the rows.

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
        runner = cls(_open_session(onnx_bytes, model_dir, intra_op_threads), spec, parallel_calls)
        runner._check(model_dir)
        return runner

    def run(self, x: np.ndarray, states: np.ndarray) -> Arrays:
        """The batch's outputs and new state rows: one ORT call, or (a large batch, `parallel_calls` > 1) one
        call per part of its rows, at once. Rows are independent sequences, so the parts' results joined are
        the whole batch's."""
        if self._helpers is None or len(x) < MIN_SPLIT_ROWS:
            return self._run_rows(x, states)
        bounds = np.linspace(0, len(x), self._parallel_calls + 1).astype(int).tolist()
        parts = [(x[a:b], states[a:b]) for a, b in itertools.pairwise(bounds)]
        others = [self._helpers.submit(self._run_rows, *part) for part in parts[1:]]
        results = [self._run_rows(*parts[0]), *(future.result() for future in others)]
        return np.concatenate([y for y, _ in results]), np.concatenate([rows for _, rows in results])

    def _run_rows(self, x: np.ndarray, states: np.ndarray) -> Arrays:
        """One ORT call, the state rows unpacked into the graph's state tensors and the new ones packed back
        (one copy each way)."""
        layout = self.spec.layout
        y, *new_states = self._graph.run(x, layout.unpack(states))
        return y, layout.pack(new_states, len(x))

    def _check(self, model_dir: Path) -> None:
        """The graph is as its card says and can be streamed: chunked runs from random states equal whole
        runs. Its runs also warm it up (ORT allocates its buffers and plans its kernels on the first run)."""
        try:
            check_signature(self._graph.session, self.spec)
            check_streamable(self._graph, np.random.default_rng(0))
            warm_up = np.zeros((1, 1, *self.spec.graph_input_dims), self.spec.input_dtype)
            self.run(warm_up, self._zeros())
        except (GraphMismatchError, NotStreamableError) as exc:
            raise ModelLoadError(f"{ONNX_FILE} in {model_dir} cannot be served: {exc}") from exc
        except Exception as exc:  # ORT's own errors, or a state the graph returns in another shape
            raise ModelLoadError(f"corrupt model: a run of {ONNX_FILE} in {model_dir} failed: {exc}") from exc

    def _zeros(self) -> np.ndarray:
        return np.zeros((1, self.spec.state_size), np.float32)


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
    # Errors only: graphs exported elsewhere (silero VAD's) warn of unused initializers on every load.
    options.log_severity_level = 3
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
