"""Export verification: ONNX Runtime against PyTorch, and chunked runs against whole runs.

Every export runs `verify_parity`; a miss raises `ExportError`, so no artifact claims parity it does not have.
The chunked-against-whole half is `modelcard.graph`'s, the same check `conveyor card` and the server run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.errors import ExportError
from modelcard import ModelSpec
from modelcard.card import ParityCase, ParityReport
from modelcard.graph import (
    TOLERANCE,
    Graph,
    NotStreamableError,
    chunking_cases,
    compare,
    failing,
    open_session,
    random_inputs,
    random_states,
)

__all__ = ["TOLERANCE", "verify_parity"]


def _run_torch(module: nn.Module, x: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
    """The PyTorch reference for `Graph.run`."""
    with torch.no_grad():
        y, new_states = module(torch.from_numpy(x), tuple(torch.from_numpy(state) for state in states))
    return [y.numpy(), *(state.numpy() for state in new_states)]


def _sample_batch(spec: ModelSpec, samples: list[np.ndarray]) -> np.ndarray:
    # Cropped to the shortest, not padded: every row is then real data all the way to the final state.
    length = min(len(sample) for sample in samples)
    return np.stack([sample[:length] for sample in samples]).astype(spec.input_dtype)


def _inputs(spec: ModelSpec, samples: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Lengths other than the traced example's 3 and batches of 1 and more: a frozen axis fails here.
    return {
        "random b=1": random_inputs(spec, 1, 17, rng),
        "random b=4": random_inputs(spec, 4, 9, rng),
        "task b=1": _sample_batch(spec, samples[:1]),
        f"task b={len(samples)}": _sample_batch(spec, samples),
    }


def verify_parity(
    module: nn.Module,
    onnx_bytes: bytes,
    spec: ModelSpec,
    samples: list[np.ndarray],
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch, and chunked with whole runs, on random inputs and `samples` (real
    sequences, [time, ...] each).

    Random initial states; batch sizes 1 and `len(samples)`; y and every state compared. Raises `ExportError`
    naming every case whose scaled difference (see `ParityCase`) exceeds `tolerance`; returns the figures
    otherwise.
    """
    rng = np.random.default_rng(seed)
    graph = Graph(open_session(onnx_bytes), spec)
    versus_torch: list[ParityCase] = []
    chunked: list[ParityCase] = []
    for label, x in _inputs(spec, samples, rng).items():
        states = random_states(spec, x.shape[0], rng)
        reference = _run_torch(module, x, states)
        try:
            versus_torch.append(compare(f"{label}: ort vs torch", graph.run(x, states), reference))
            chunked.extend(chunking_cases(graph, x, label, rng))
        except Exception as exc:  # ORT's own errors: the graph does not run at this batch size or length
            raise ExportError(
                f"the exported graph does not run on {label} (x {list(x.shape)}): {exc}. A Python loop over "
                "time is traced at the example's length, freezing the time axis: use PyTorch's recurrent "
                "modules (nn.LSTM, nn.GRU, nn.RNN), which export with a dynamic time axis"
            ) from exc
    misses = failing(versus_torch, tolerance)
    if misses:
        raise ExportError(f"parity check failed (tolerance {tolerance:g}): {misses}")
    misses = failing(chunked, tolerance)
    if misses:
        raise ExportError(str(NotStreamableError(misses)))
    return ParityReport(
        ort_vs_torch_max_abs=max(case.max_abs for case in versus_torch),
        ort_vs_torch_max_scaled=max(case.max_scaled for case in versus_torch),
        chunked_vs_whole_max_abs=max(case.max_abs for case in chunked),
        tolerance=tolerance,
        cases=tuple(versus_torch + chunked),
    )
