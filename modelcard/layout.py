"""A session's state as one float32 row, and the graph's named state tensors as ONNX Runtime takes them.

The domain keeps a session's state as a flat row: the state tensors' session parts, one after another, each in
C order. Only the runner needs the graph's own shapes, so only it packs and unpacks (numpy only).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from modelcard.card import StateTensor


class StateLayout:
    """Where each state tensor's session part sits in a state row."""

    def __init__(self, states: tuple[StateTensor, ...]) -> None:
        self.states = states
        bounds = [0, *itertools.accumulate(tensor.size for tensor in states)]
        self._slices = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
        self.size = bounds[-1]  # floats per session

    def unpack(self, rows: np.ndarray) -> list[np.ndarray]:
        """Rows [B, size] -> each state tensor in the graph's shape (batch B at its axis), contiguous."""
        batch = rows.shape[0]
        return [
            np.ascontiguousarray(
                np.moveaxis(rows[:, part].reshape(batch, *tensor.row_shape), 0, tensor.batch_axis)
            )
            for tensor, part in zip(self.states, self._slices, strict=True)
        ]

    def pack(self, tensors: Sequence[np.ndarray], batch: int) -> np.ndarray:
        """The graph's state tensors for `batch` sessions -> rows [batch, size] (a new array).

        `ValueError` naming the tensor when one's shape is not the declared one at that batch size."""
        rows = np.empty((batch, self.size), np.float32)
        for tensor, part, array in zip(self.states, self._slices, tensors, strict=True):
            expected = tuple(batch if size is None else size for size in tensor.shape)
            if array.shape != expected:
                raise ValueError(f"{tensor.output!r} is {list(array.shape)}, expected {list(expected)}")
            rows[:, part] = np.moveaxis(array, tensor.batch_axis, 0).reshape(batch, tensor.size)
        return rows

    def zeros(self, batch: int) -> list[np.ndarray]:
        """Every state tensor at its initial value (zeros) for `batch` sessions."""
        return self.unpack(np.zeros((batch, self.size), np.float32))
