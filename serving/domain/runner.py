"""The seam between the domain and a model runtime: the `StepRunner` protocol.

A runner serves one model (`spec`) and runs one batch of independent sequences from their states:
    x   int64 [B, T] (tokens) | float32 [B, T, features]
    h, c  float32 [layers, B, hidden]
 -> y   float32 [B, T, outputs];  hn, cn  float32 [layers, B, hidden]
The server's runner is ONNX Runtime's (`serving.server.onnx_runner`); tests use a fake one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from modelcard import ModelSpec

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


class StepRunner(Protocol):
    """Runs batches of the model `spec` describes: `(x, h, c) -> (y, hn, cn)`, shapes as in this module."""

    @property
    def spec(self) -> ModelSpec:
        """The model this runner runs."""
        ...

    def run(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Arrays:
        """Outputs of every timestep and the state after the last one, for each row of the batch."""
        ...
