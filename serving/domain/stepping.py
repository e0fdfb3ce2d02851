"""From a chunk's inputs to the runner's steps, and back: the engine's one way to run chunks.

Most models take a chunk's steps as they come. A framed model (silero VAD) takes windows of a sample stream
(`modelcard.framing`): a session's row then holds the graph's state and, after it, the samples it carries,
and a chunk of any number of samples runs the windows it completes, none to many. Rows that complete the same
number of windows run as one block; a row that completes none runs nothing and only carries its samples on.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import numpy as np

from modelcard import ModelSpec
from modelcard.framing import Framing
from serving.domain.backlog import Backlog
from serving.domain.batcher import Batcher, RowResult


class BlockResult(NamedTuple):
    """A block's outputs y [rows, time, outputs], its new session rows, and (a framed model) how many of each
    row's outputs are windows it completed: the rest are zeros. None: every row's outputs are all its own."""

    ys: np.ndarray
    new_states: np.ndarray
    counts: np.ndarray | None

    def own(self, row: int) -> np.ndarray:
        """Row `row`'s outputs, without the zeros after its windows."""
        return self.ys[row] if self.counts is None else self.ys[row, : self.counts[row]]

    def last(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's last output [rows, 1, outputs] and, framed, whether it has one."""
        if self.counts is None:
            return self.ys[:, -1:], None
        last = np.zeros((len(self.ys), 1, self.ys.shape[2]), np.float32)
        rows = np.flatnonzero(self.counts)
        last[rows, 0] = self.ys[rows, self.counts[rows] - 1]
        return last, np.minimum(self.counts, 1)


class Stepper:
    """Runs chunks of the model `spec` describes through `batcher`."""

    def __init__(self, batcher: Batcher, spec: ModelSpec) -> None:
        self._batcher = batcher
        self._framing = spec.framing
        self._state_size = spec.state_size  # the graph's part of a session's row
        self._output_size = spec.output_size

    def most_outputs(self, steps: int) -> int:
        """The most outputs a chunk of `steps` steps can have."""
        return steps if self._framing is None else self._framing.most_windows(steps)

    async def run(self, x: np.ndarray, state: np.ndarray, offset: int, backlog: Backlog | None) -> RowResult:
        """One session's chunk `x` from its row `state`, `offset` steps into its sequence: its outputs and new
        row. `backlog`: the queue its answer joins, if others may be ahead in it."""
        if self._framing is None:
            return await self._batcher.run(x, state, backlog)
        windows, carry = self._framing.cut(state[None, self._state_size :], np.array([offset]), x[None, :, 0])
        model_state = state[: self._state_size]
        if windows.shape[1]:
            y, model_state = await self._batcher.run(windows[0], model_state, backlog)
        else:
            y = np.zeros((0, self._output_size), np.float32)
        return y, np.concatenate([model_state, carry[0]])

    async def run_block(self, x: np.ndarray, states: np.ndarray, offsets: list[int]) -> BlockResult:
        """Many sessions' chunks of one length, `x` [rows, time, ...] from their rows `states` at `offsets`,
        with whatever else of that shape waits."""
        if self._framing is None:
            ys, new_states = await self._batcher.run_block(x, states)
            return BlockResult(ys, new_states, None)
        return await self._run_framed(self._framing, x[:, :, 0], states, np.array(offsets))

    async def _run_framed(
        self, framing: Framing, samples: np.ndarray, states: np.ndarray, offsets: np.ndarray
    ) -> BlockResult:
        """Each group of rows completing the same number of windows cut and run as one block, the groups at
        once."""
        counts = (offsets + samples.shape[1]) // framing.window - offsets // framing.window
        new_states = states.copy()
        ys = np.zeros((len(samples), framing.most_windows(samples.shape[1]), self._output_size), np.float32)
        runs = []
        for count in np.unique(counts).tolist():
            rows = np.flatnonzero(counts == count)
            carry = states[rows, self._state_size :]
            windows, new_states[rows, self._state_size :] = framing.cut(carry, offsets[rows], samples[rows])
            if count:
                runs.append((rows, self._batcher.run_block(windows, states[rows, : self._state_size])))
        for (rows, _), (y, model_states) in zip(
            runs, await asyncio.gather(*(run for _, run in runs)), strict=True
        ):
            ys[rows, : y.shape[1]] = y
            new_states[rows, : self._state_size] = model_states
        return BlockResult(ys, new_states, counts)
