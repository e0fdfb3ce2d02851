"""Export verification: ONNX Runtime against PyTorch, and chunked runs against whole runs.

Every export runs `verify_parity`; a miss raises `ExportError`, so no artifact claims parity it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from export.errors import ExportError
from modelcard import INPUT_NAMES, OUTPUT_NAMES
from training.model import SequenceModel

TOLERANCE = 1e-5

# (y, hn, cn) as numpy: y (B, T, outputs); hn, cn (layers, B, H)
Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]


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
    """The figures recorded in the model card's `parity` field."""

    ort_vs_torch_max_abs: float
    ort_vs_torch_max_scaled: float
    chunked_vs_whole_max_abs: float
    tolerance: float
    cases: tuple[ParityCase, ...]


def _open_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on one thread: verification is small and shares the machine."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _run_ort(session: ort.InferenceSession, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Outputs:
    """One ONNX Runtime call: (x, h0, c0) -> (y, hn, cn)."""
    y, hn, cn = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (x, h, c), strict=True)))
    return y, hn, cn


def _run_torch(model: SequenceModel, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Outputs:
    """The PyTorch reference for `_run_ort`."""
    with torch.no_grad():
        y, (hn, cn) = model(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
    return y.numpy(), hn.numpy(), cn.numpy()


def _run_ort_chunked(
    session: ort.InferenceSession, x: np.ndarray, h: np.ndarray, c: np.ndarray, cuts: list[int]
) -> Outputs:
    """Run `x` split along time at `cuts`, carrying (hn, cn) from chunk to chunk like a streaming client."""
    ys = []
    for chunk in np.split(x, cuts, axis=1):
        y, h, c = _run_ort(session, chunk, h, c)
        ys.append(y)
    return np.concatenate(ys, axis=1), h, c


def _compare(name: str, a: Outputs, b: Outputs) -> ParityCase:
    """Differences over y, hn and cn, `b` the reference (NaN if any side has a NaN)."""
    pairs = list(zip(a, b, strict=True))
    max_abs = max(float(np.max(np.abs(left - right))) for left, right in pairs)
    max_scaled = max(float(np.max(np.abs(left - right) / (1 + np.abs(right)))) for left, right in pairs)
    return ParityCase(name, max_abs, max_scaled)


def _random_cuts(length: int, rng: np.random.Generator) -> list[int]:
    """1 to 4 sorted distinct chunk boundaries inside (0, length); none when length < 2."""
    count = min(int(rng.integers(1, 5)), length - 1)
    return sorted(int(cut) for cut in rng.choice(np.arange(1, length), size=count, replace=False))


def _random_batch(model: SequenceModel, batch: int, time: int, rng: np.random.Generator) -> np.ndarray:
    config = model.config
    if config.input_kind == "tokens":
        return rng.integers(0, config.input_size, size=(batch, time), dtype=np.int64)
    return rng.standard_normal((batch, time, config.input_size), dtype=np.float32)


def _task_batch(model: SequenceModel, sequences: list[np.ndarray]) -> np.ndarray:
    # Cropped to the shortest, not padded: every row is then real data all the way to the final state.
    length = min(len(sequence) for sequence in sequences)
    dtype = np.int64 if model.config.input_kind == "tokens" else np.float32
    return np.stack([sequence[:length] for sequence in sequences]).astype(dtype)


def _random_state(
    model: SequenceModel, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    # Non-zero, so the h0/c0 inputs are exercised rather than multiplied away.
    shape = (model.config.num_layers, batch, model.config.hidden_size)
    return (
        0.5 * rng.standard_normal(shape, dtype=np.float32),
        0.5 * rng.standard_normal(shape, dtype=np.float32),
    )


def _inputs(
    model: SequenceModel, sequences: list[np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    # Lengths other than the traced example's 3 and batches of 1 and more: a frozen axis fails here.
    return {
        "random b=1": _random_batch(model, 1, 17, rng),
        "random b=4": _random_batch(model, 4, 9, rng),
        "task b=1": _task_batch(model, sequences[:1]),
        f"task b={len(sequences)}": _task_batch(model, sequences),
    }


def _chunkings(x: np.ndarray, rng: np.random.Generator) -> dict[str, list[int]]:
    """Chunk boundaries by label: three random chunkings, plus one step per call for a single row."""
    length = x.shape[1]
    chunkings = {}
    for _ in range(3):
        cuts = _random_cuts(length, rng)
        chunkings["+".join(str(size) for size in np.diff([0, *cuts, length]))] = cuts
    if x.shape[0] == 1:
        chunkings["1-step"] = list(range(1, length))  # the streaming extreme
    return chunkings


def _check(report: ParityReport) -> None:
    # `not <=` rather than `>`, so a NaN difference is a miss too.
    misses = [case for case in report.cases if not case.max_scaled <= report.tolerance]
    if misses:
        listed = "; ".join(
            f"{case.name}: max |a-b|/(1+|b|) {case.max_scaled:.3g} (abs {case.max_abs:.3g})"
            for case in misses
        )
        raise ExportError(f"parity check failed (tolerance {report.tolerance:g}): {listed}")


def verify_parity(
    model: SequenceModel,
    onnx_bytes: bytes,
    sequences: list[np.ndarray],
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch, and chunked with whole runs, on random and task `sequences`.

    Random initial states; batch sizes 1 and `len(sequences)`; y, hn and cn all compared. Raises `ExportError`
    naming every case whose scaled difference (see `ParityCase`) exceeds `tolerance`; returns the figures
    otherwise.
    """
    rng = np.random.default_rng(seed)
    session = _open_session(onnx_bytes)
    versus_torch: list[ParityCase] = []
    chunked: list[ParityCase] = []
    for name, x in _inputs(model, sequences, rng).items():
        h, c = _random_state(model, x.shape[0], rng)
        whole = _run_ort(session, x, h, c)
        versus_torch.append(_compare(f"{name}: ort vs torch", whole, _run_torch(model, x, h, c)))
        chunked.extend(
            _compare(f"{name}: chunks {label} vs whole", _run_ort_chunked(session, x, h, c, cuts), whole)
            for label, cuts in _chunkings(x, rng).items()
        )
    report = ParityReport(
        ort_vs_torch_max_abs=max(case.max_abs for case in versus_torch),
        ort_vs_torch_max_scaled=max(case.max_scaled for case in versus_torch),
        chunked_vs_whole_max_abs=max(case.max_abs for case in chunked),
        tolerance=tolerance,
        cases=tuple(versus_torch + chunked),
    )
    _check(report)
    return report
