"""The batcher with a fake runner, no gRPC: gather, group by length, run once, split, answer each caller."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fakes import FakeRunner

from serving.domain.batcher import Batcher, BatchShapeError, RowResult
from serving.domain.errors import ShuttingDownError
from serving.domain.runner import StepRunner

pytestmark = pytest.mark.timeout(30)

LAYERS, HIDDEN = 2, 3


class RecordingMetrics:
    """Keeps what the batcher reports."""

    def __init__(self) -> None:
        self.queue_waits: list[float] = []
        self.batches: list[tuple[int, float]] = []

    def observe_queue_wait(self, seconds: float, chunks: int = 1) -> None:
        self.queue_waits += [seconds] * chunks

    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batches.append((size, inference_s))


def _chunks(lengths: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 50, n), rng.standard_normal(2 * LAYERS * HIDDEN).astype(np.float32)) for n in lengths
    ]


def _alone(x: np.ndarray, state: np.ndarray) -> RowResult:
    y, new_states = FakeRunner().run(x[None], state[None])
    return y[0], new_states[0]


async def _run_all(
    batcher: Batcher, chunks: list[tuple[np.ndarray, np.ndarray]]
) -> list[RowResult | BaseException]:
    try:
        return await asyncio.gather(*(batcher.run(x, s) for x, s in chunks), return_exceptions=True)
    finally:
        batcher.close()


def _batcher(
    runner: StepRunner,
    max_batch_size: int = 64,
    max_delay_ms: float = 0.0,
    metrics: RecordingMetrics | None = None,
    inline_max_ms: float = 0.5,
) -> Batcher:
    return Batcher(
        runner,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        inline_max_ms=inline_max_ms,
        metrics=metrics or RecordingMetrics(),
    )


def test_every_row_equals_its_run_alone_and_batches_group_by_length() -> None:
    runner = FakeRunner()
    lengths = [3, 5, 3, 1, 5, 3, 1, 3]
    chunks = _chunks(lengths)
    results = asyncio.run(_run_all(_batcher(runner), chunks))
    for (x, state), result in zip(chunks, results, strict=True):
        assert not isinstance(result, BaseException)
        expected_y, expected_state = _alone(x, state)
        assert np.array_equal(result[0], expected_y) and np.array_equal(result[1], expected_state)
        assert result[1].shape == (2 * LAYERS * HIDDEN,) and result[1].flags.c_contiguous
    # Everything was waiting when the worker first ran: one call per length, the oldest chunk's length first.
    assert runner.calls == [(4, 3), (2, 5), (2, 1)]


def test_max_batch_size_caps_each_call_and_one_means_unbatched() -> None:
    for max_batch_size, expected in ((4, [4, 4, 2]), (1, [1] * 10)):
        runner = FakeRunner()
        asyncio.run(_run_all(_batcher(runner, max_batch_size), _chunks([2] * 10)))
        assert [batch for batch, _ in runner.calls] == expected


def test_a_delay_lets_a_batch_fill_and_no_delay_takes_what_waits() -> None:
    async def staggered(batcher: Batcher) -> None:
        chunks = _chunks([2] * 4)
        first = asyncio.create_task(batcher.run(*chunks[0]))
        await asyncio.sleep(0.02)  # the first chunk is alone for a while
        await asyncio.gather(first, *(batcher.run(x, s) for x, s in chunks[1:]))
        batcher.close()

    for max_delay_ms, expected in ((2000.0, [4]), (0.0, [1, 3])):
        runner = FakeRunner()
        asyncio.run(staggered(_batcher(runner, max_batch_size=4, max_delay_ms=max_delay_ms)))
        assert [batch for batch, _ in runner.calls] == expected  # the full batch ends the 2 s wait early


class ShortRunner(FakeRunner):
    """Returns one row too few: the split check must catch it."""

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, new_states = super().run(x, states)
        return y[1:], new_states


class FailingOnceRunner(FakeRunner):
    """Fails its first call."""

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.calls:
            self.calls.append((0, 0))
            raise RuntimeError("runtime broke")
        return super().run(x, states)


def test_a_wrong_split_size_fails_every_caller_of_the_batch() -> None:
    results = asyncio.run(_run_all(_batcher(ShortRunner()), _chunks([2, 2])))
    assert all(isinstance(result, BatchShapeError) for result in results)
    assert "returned y [1, 2, 3]" in str(results[0])


def test_a_runner_error_reaches_its_batch_and_the_worker_goes_on() -> None:
    async def scenario() -> tuple[list[RowResult | BaseException], RowResult]:
        batcher = _batcher(FailingOnceRunner())
        failed = await asyncio.gather(
            *(batcher.run(x, s) for x, s in _chunks([2, 2])), return_exceptions=True
        )
        later = await batcher.run(*_chunks([2])[0])
        batcher.close()
        return failed, later

    failed, later = asyncio.run(scenario())
    assert all(isinstance(result, RuntimeError) for result in failed)
    assert later[0].shape == (2, HIDDEN)


def test_metrics_see_every_chunk_and_batch() -> None:
    metrics = RecordingMetrics()
    batcher = _batcher(FakeRunner(), metrics=metrics)
    asyncio.run(_run_all(batcher, _chunks([2, 2, 3])))
    assert len(metrics.queue_waits) == 3 and all(wait >= 0 for wait in metrics.queue_waits)
    assert [size for size, _ in metrics.batches] == [2, 1]


def test_close_fails_waiting_chunks_and_refuses_new_ones() -> None:
    async def scenario() -> list[RowResult | BaseException]:
        batcher = _batcher(FakeRunner())
        waiting = asyncio.ensure_future(batcher.run(*_chunks([2])[0]))
        await asyncio.sleep(0)  # the chunk is queued and the worker created, but it has not run yet
        batcher.close()
        late = asyncio.ensure_future(batcher.run(*_chunks([2])[0]))
        return list(await asyncio.gather(waiting, late, return_exceptions=True))

    assert all(isinstance(result, ShuttingDownError) for result in asyncio.run(scenario()))


class ThreadRecordingRunner(FakeRunner):
    """Notes the thread each call runs on, and takes `seconds_per_step` per timestep."""

    def __init__(self, seconds_per_step: float) -> None:
        super().__init__()
        self.seconds_per_step = seconds_per_step
        self.threads: list[str] = []

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds_per_step * x.shape[1])
        return super().run(x, states)


def test_short_batches_run_inline_once_timed_and_long_ones_on_the_runner_thread() -> None:
    async def one_at_a_time(batcher: Batcher, lengths: list[int]) -> None:
        for x, state in _chunks(lengths):
            await batcher.run(x, state)
        batcher.close()

    # Limits far from the runners' times, so a busy machine cannot move a batch across them.
    fast = ThreadRecordingRunner(seconds_per_step=0.0)
    asyncio.run(one_at_a_time(_batcher(fast, inline_max_ms=200), [1, 1, 1]))
    main = threading.current_thread().name
    # The first batch of a size is timed on the runner thread; later ones predicted short run on the loop's.
    assert fast.threads[0].startswith("conveyor-runner") and fast.threads[1:] == [main, main]

    slow = ThreadRecordingRunner(seconds_per_step=0.02)
    asyncio.run(one_at_a_time(_batcher(slow, inline_max_ms=5), [1, 1, 1]))
    assert all(name.startswith("conveyor-runner") for name in slow.threads)
