"""The seam between the domain and a model runtime: the `StepRunner` protocol.

A runner serves one model (`spec`) and runs one batch of independent sequences from their states:
    x       int64 [B, T] (tokens) | float32 [B, T, features]
    states  float32 [B, spec.state_size]: each session's state row (`modelcard.layout`)
 -> y       float32 [B, T, outputs];  new states  float32 [B, spec.state_size]
What the state tensors are (an LSTM's h and c, a GRU's h, any model's own) is the runner's business alone.
The server's runner is ONNX Runtime's (`serving.server.onnx_runner`); tests use a fake one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from modelcard import ModelSpec

Arrays = tuple[np.ndarray, np.ndarray]  # y, new states


class StepRunner(Protocol):
    """Runs batches of the model `spec` describes: `(x, states) -> (y, new states)`, shaped as above."""

    @property
    def spec(self) -> ModelSpec:
        """The model this runner runs."""
        ...

    def run(self, x: np.ndarray, states: np.ndarray) -> Arrays:
        """Outputs of every timestep and the state after the last one, for each row of the batch."""
        ...
