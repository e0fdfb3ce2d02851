"""Fakes for the domain's unit tests: a clock and a `StepRunner` in numpy. Light on purpose: neither grpc nor
onnxruntime is imported here, so the domain's tests (and the runtime-free check) can use them."""

from __future__ import annotations

import numpy as np

from modelcard import ModelSpec
from modelcard.card import recurrent_states


class FakeClock:
    """A clock that moves only when told to: injected as the server's session clock."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now_s += seconds


FAKE_LAYERS, FAKE_HIDDEN, FAKE_VOCABULARY = 2, 3, 50
FAKE_SPEC = ModelSpec(
    name="fake",
    task="fake",
    input_kind="tokens",
    input_size=FAKE_VOCABULARY,
    output_size=FAKE_HIDDEN,
    output_meaning="the last layer's h",
    output_labels=("a", "b", "c"),
    vocabulary=tuple(f"w{i}" for i in range(FAKE_VOCABULARY)),
    layers=FAKE_LAYERS,
    hidden=FAKE_HIDDEN,
    fingerprint="ef" * 32,
    states=recurrent_states(("h", "c"), FAKE_LAYERS, FAKE_HIDDEN),
)


class FakeRunner:
    """A `StepRunner` in numpy for unit tests: rows independent, so batching must not change any row.

    Per step: h = 0.5 h + 0.25 sum(x_t), c = c + h; y_t = h of the last layer. Only exactly rounded float32
    operations, so a row's result is bitwise the same in any batch.
    """

    def __init__(self, spec: ModelSpec = FAKE_SPEC) -> None:
        self.spec = spec
        self.calls: list[tuple[int, int]] = []  # (batch, time) of each run

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x [B, T] or [B, T, F], state rows [B, 2 x layers x H]: h then c) -> (y [B, T, H], new rows)."""
        batch, steps = x.shape[:2]
        self.calls.append((batch, steps))
        drive = x.reshape(batch, steps, -1).sum(axis=2, dtype=np.float32)  # [B, T]
        both = states.reshape(batch, 2, self.spec.layers, self.spec.hidden)
        h, c = both[:, 0], both[:, 1]  # (B, layers, H)
        outputs = []
        for t in range(steps):
            h = np.float32(0.5) * h + np.float32(0.25) * drive[:, t, None, None]
            c = c + h
            outputs.append(h[:, -1])
        return np.stack(outputs, axis=1), np.stack((h, c), axis=1).reshape(batch, -1)
