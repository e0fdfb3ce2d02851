"""Cross-session batching: chunks waiting from many sessions run as one runner call, then split back.

Only chunks of the same length share a batch: a shorter row padded to a longer one would end in a different
state, so grouping by length keeps every row's output exactly what it would be alone. The caller (the engine)
sends at most one chunk per session at a time, so reordering across sessions never reorders a session, and the
queue is bounded by the number of live sessions.
A chunk whose answer will wait behind others anyway is held for company (`serving.domain.backlog`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.domain.backlog import HOLD_MAX_S, Backlog
from serving.domain.errors import ShuttingDownError
from serving.domain.runner import StepRunner

# A chunk's result, y [time, outputs] and the new state row [state size]; or a block's (a frame: many
# sessions' chunks of one length), y [rows, time, outputs] and the new rows [rows, state size]. Views of the
# batch's arrays: a caller that keeps one past its use copies it.
RowResult = tuple[np.ndarray, np.ndarray]
_Computed = tuple[list[RowResult], float]  # each item's rows, and the batch's inference seconds

# Where a batch runs. On the runner thread, the event loop keeps reading and answering while ORT runs (it
# releases the GIL), and a runtime that stalls never stalls the loop. But the hand-off costs two thread
# wake-ups, one through the loop's self-pipe, which can cost more than ORT takes for a small one-step batch
# (docs/benchmarks.md has the figures). So a batch predicted to take less than `inline_max_ms` runs on the
# loop thread itself: the loop is held that long at most, and the hand-off is gone. Predictions come from
# batches already timed at a similar size; a size not yet timed runs on the thread, so a slow model is never
# run inline on a guess.
_WEIGHT = 0.2  # of the newest batch in a running estimate


class BatchMetrics(Protocol):
    """What the batcher reports; `serving.server.metrics.ConveyorMetrics` implements it."""

    def observe_queue_wait(self, seconds: float, chunks: int = 1) -> None:
        """Time `chunks` chunks (one, or a frame's) waited between submission and the start of their batch."""

    def observe_batch(self, size: int, inference_s: float) -> None:
        """One runner call: rows in the batch and the call's duration."""


class BatchShapeError(RuntimeError):
    """The runner returned outputs whose sizes do not match the batch it was given."""


@dataclass(slots=True)
class _Pending:
    x: np.ndarray  # [rows, time] or [rows, time, features]: one chunk (one row), or a frame's block
    states: np.ndarray  # [rows, state size]
    future: asyncio.Future[RowResult]
    backlog: Backlog | None  # None: its answer goes out at once, so it never waits for company
    enqueued_s: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers chunks, runs each batch once (short ones inline, others on a thread), answers each caller.

    Driven by loop callbacks, not a worker task: a chunk's arrival schedules a flush (`call_soon`, or
    `call_later` for a delay), which takes what waits and runs it. Each await between tasks costs an
    event-loop pass, and at one session those passes are most of a chunk's latency.
    """

    def __init__(
        self,
        runner: StepRunner,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        inline_max_ms: float,
        metrics: BatchMetrics,
    ) -> None:
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_ms / 1000
        self._inline_max_s = inline_max_ms / 1000  # 0: every batch on the runner thread
        self._metrics = metrics
        self._pending: list[_Pending] = []
        self._pending_rows = 0  # chunks waiting: a frame's block counts each of its rows
        self._running: list[_Pending] = []  # the batch on the runner thread; the next waits for it
        # The loop the first chunk arrived on; kept, because asking asyncio for it costs a system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_due: asyncio.Handle | None = None
        self._held = False  # what waits is held for company: `_flush_due` ends the hold at the latest
        # One thread: batches run one at a time, and chunks arriving meanwhile form the next batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-runner")
        self._cost = _BatchCost()
        self._closed = False

    async def run(self, x: np.ndarray, state: np.ndarray, backlog: Backlog | None = None) -> RowResult:
        """Run one session's chunk `x` from `state`; returns its outputs [time, outputs] and its new state.
        `backlog`: the queue its answer joins, if others may be ahead in it."""
        y, new_states = await self.run_block(x[None], state[None], backlog)
        return y[0], new_states[0]

    async def run_block(self, x: np.ndarray, states: np.ndarray, backlog: Backlog | None = None) -> RowResult:
        """Run many sessions' chunks of one length, `x` [rows, time, ...] from `states` [rows, state size], in
        one batch with whatever else of that length waits; returns y [rows, time, outputs] and the new rows.
        A block is never split, so it may exceed max_batch_size alone."""
        if self._closed:
            raise ShuttingDownError()
        loop = self._loop = self._loop or asyncio.get_running_loop()
        item = _Pending(x, states, loop.create_future(), backlog)
        self._pending.append(item)
        self._pending_rows += len(x)
        if self._held and (backlog is None or not backlog.ahead()):
            self._wake()  # its answer would go out at once: what is held runs with it
        else:
            self._schedule()
        return await item.future

    def close(self) -> None:
        """Stop batching; chunks still waiting or running fail with `ShuttingDownError`."""
        self._closed = True
        if self._flush_due is not None:
            self._flush_due.cancel()
        for item in [*self._pending, *self._running]:
            if not item.future.done():
                item.future.set_exception(ShuttingDownError())
        self._pending, self._running, self._pending_rows = [], [], 0
        # No wait: a batch still running (past the grace period) must not hold up the stop.
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None  # set by the first `run`, before anything is scheduled
        return self._loop

    def _schedule(self) -> None:
        """Arrange the next flush: at once (next loop pass), or when the oldest chunk's delay runs out."""
        if self._running or not self._pending or self._closed:
            return  # a threaded batch's end schedules the next flush
        full = self._pending_rows >= self._max_batch_size
        due = self._flush_due
        if due is not None:
            if not (full and isinstance(due, asyncio.TimerHandle)):
                return
            due.cancel()  # the batch filled before its delay ran out
        loop = self._bound_loop
        if full:
            self._flush_due = loop.call_soon(self._flush)
        elif self._max_delay_s > 0:
            wait_s = self._pending[0].enqueued_s + self._max_delay_s - time.perf_counter()
            self._flush_due = loop.call_later(max(wait_s, 0.0), self._flush)
        else:
            self._flush_due = loop.call_soon(self._gather)

    def _gather(self) -> None:
        # No delay: flush two loop passes on, not one. A request read in the pass that scheduled this starts
        # its task in the next pass; waiting one more lets the chunks of requests already received join.
        self._flush_due = self._bound_loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = None
        if self._hold():
            return
        self._held = False
        batch = self._take()
        if batch:
            self._start(batch)
        self._schedule()

    def _hold(self) -> bool:
        """Hold what waits (once per batch) when every caller's answer would queue behind others anyway; a
        drained backlog, a caller without one, a full batch or `HOLD_MAX_S` ends the hold."""
        if self._held or not self._pending or self._pending_rows >= self._max_batch_size:
            return False
        backlogs = {item.backlog for item in self._pending}
        ahead = [backlog for backlog in backlogs if backlog is not None and backlog.ahead()]
        if len(ahead) < len(backlogs):
            return False
        self._held = True
        self._flush_due = self._bound_loop.call_later(HOLD_MAX_S, self._flush)
        for backlog in ahead:
            backlog.on_drain(self._wake)
        return True

    def _wake(self) -> None:
        if self._held and isinstance(self._flush_due, asyncio.TimerHandle):
            self._flush_due.cancel()
            self._flush_due = self._bound_loop.call_soon(self._flush)

    def _take(self) -> list[_Pending]:
        # The oldest chunk's length picks the group, so no length waits forever behind busier ones.
        waiting = [item for item in self._pending if not item.future.done()]
        if not waiting:
            self._pending, self._pending_rows = [], 0
            return []
        shape = waiting[0].x.shape[1:]
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        rows = 0
        for item in waiting:
            fits = (not batch or rows + len(item.x) <= self._max_batch_size) and item.x.shape[1:] == shape
            (batch if fits else rest).append(item)
            rows += len(item.x) if fits else 0
        self._pending = rest
        self._pending_rows = _rows(rest)
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for item in batch:
            self._metrics.observe_queue_wait(started - item.enqueued_s, len(item.x))  # a frame's chunks each
        predicted_s = self._cost.predict(_rows(batch), batch[0].x.shape[1])
        if predicted_s is not None and predicted_s < self._inline_max_s:
            try:
                computed: _Computed | Exception = self._compute(batch)
            except Exception as exc:
                computed = exc
            self._finish(batch, computed)
            return
        self._running = batch
        running = self._bound_loop.run_in_executor(self._executor, self._compute, batch)
        running.add_done_callback(functools.partial(self._threaded_done, batch))

    def _threaded_done(self, batch: list[_Pending], running: asyncio.Future[_Computed]) -> None:
        if self._closed:  # its callers were failed by `close`
            return
        self._running = []
        error = running.exception()
        self._finish(batch, running.result() if error is None else error)
        self._schedule()

    def _finish(self, batch: list[_Pending], computed: _Computed | BaseException) -> None:
        """Answer every caller of the batch: its row, or the batch's failure (the batcher goes on)."""
        if isinstance(computed, BaseException):
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(computed)
            return
        results, inference_s = computed
        self._cost.update(_rows(batch), batch[0].x.shape[1], inference_s)
        self._metrics.observe_batch(_rows(batch), inference_s)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():  # its caller may have gone (cancelled)
                item.future.set_result(result)

    def _compute(self, batch: list[_Pending]) -> _Computed:
        if len(batch) == 1:  # one chunk or one frame's block: nothing to join
            x, states = batch[0].x, batch[0].states
        else:
            x = np.concatenate([item.x for item in batch])  # [B, T] or [B, T, F]
            states = np.concatenate([item.states for item in batch])  # [B, state size]
        started = time.perf_counter()
        y, new_states = self._runner.run(x, states)  # y: [B, T, O]; new_states: [B, state size]
        inference_s = time.perf_counter() - started
        _check_split(y, new_states, x.shape[:2], states.shape)
        # Each item's rows as views of the batch's arrays: the session store keeps its own copy of a state.
        bounds = itertools.accumulate((len(item.x) for item in batch), initial=0)
        return [(y[a:b], new_states[a:b]) for a, b in itertools.pairwise(bounds)], inference_s


class _BatchCost:
    """Predicts a batch's inference seconds from batches already run at a similar size.

    A recurrent model steps through time one timestep after another, each step over all rows at once, so a
    batch's time is close to (timesteps x the cost of one step at its row count). One running estimate of that
    per-step cost is kept for each power-of-two bucket of row counts.
    """

    def __init__(self) -> None:
        self._step_s: dict[int, float] = {}  # row-count bucket -> seconds per timestep

    def predict(self, rows: int, steps: int) -> float | None:
        """Expected seconds for `rows` x `steps`; None until a batch of a similar size has been timed."""
        step_s = self._step_s.get(rows.bit_length())
        return None if step_s is None else step_s * steps

    def update(self, rows: int, steps: int, seconds: float) -> None:
        """Fold in a batch's measured time."""
        bucket, observed = rows.bit_length(), seconds / steps
        known = self._step_s.get(bucket)
        self._step_s[bucket] = observed if known is None else known + _WEIGHT * (observed - known)


def _rows(batch: list[_Pending]) -> int:
    return sum(len(item.x) for item in batch)


def _check_split(
    y: np.ndarray, new_states: np.ndarray, batch_time: tuple[int, ...], states_shape: tuple[int, ...]
) -> None:
    if y.ndim != 3 or y.shape[:2] != batch_time or new_states.shape != states_shape:
        raise BatchShapeError(
            f"the runner returned y {list(y.shape)} and states {list(new_states.shape)} for a batch of "
            f"[batch, time] {list(batch_time)} with states {list(states_shape)}"
        )
