"""Holding a batch for company (`serving.domain.backlog`): chunks whose answers would wait behind others run
together once their backlog drains, with the outputs each would get alone; anything that would be answered
sooner ends the hold, and so do a full batch and `HOLD_MAX_S`. The stream's outbox is such a backlog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest
from fakes import FakeRunner

from serving.domain.backlog import HOLD_MAX_S
from serving.domain.batcher import Batcher, RowResult
from serving.server.outbox import Outbox, StreamLimits
from serving.server.translate import end_notice
from serving.wire import pb

pytestmark = pytest.mark.timeout(30)

STATE_SIZE = 12  # the fake runner's: 2 x layers x hidden


class FakeBacklog:
    """A stream's queue of answers, ahead until drained."""

    def __init__(self, ahead: bool = True) -> None:
        self.is_ahead = ahead
        self.wakes: list[Callable[[], None]] = []

    def ahead(self) -> bool:
        return self.is_ahead

    def on_drain(self, wake: Callable[[], None]) -> None:
        if self.is_ahead:
            self.wakes.append(wake)
        else:
            wake()

    def drain(self) -> None:
        self.is_ahead = False
        wakes, self.wakes = self.wakes, []
        for wake in wakes:
            wake()


class Batches:
    """Records each runner call's size (the batcher's metrics)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def observe_queue_wait(self, seconds: float, chunks: int = 1) -> None:
        pass

    def observe_batch(self, size: int, inference_s: float) -> None:
        self.sizes.append(size)


def _batcher(batches: Batches, max_batch_size: int = 64) -> Batcher:
    return Batcher(
        FakeRunner(), max_batch_size=max_batch_size, max_delay_ms=0.0, inline_max_ms=0.5, metrics=batches
    )


def _chunk(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50, 1), rng.standard_normal(STATE_SIZE).astype(np.float32)


def _check_alone(chunks: list[tuple[np.ndarray, np.ndarray]], results: list[RowResult]) -> None:
    for (x, state), (y, new_state) in zip(chunks, results, strict=True):
        expected_y, expected_state = FakeRunner().run(x[None], state[None])
        np.testing.assert_array_equal(y, expected_y[0])
        np.testing.assert_array_equal(new_state, expected_state[0])


async def _passes(count: int = 10) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_chunks_behind_a_backlog_wait_for_it_to_drain_and_run_as_one_batch() -> None:
    async def scenario() -> None:
        batches, backlog = Batches(), FakeBacklog()
        batcher = _batcher(batches)
        chunks = [_chunk(seed) for seed in range(5)]
        calls = [asyncio.create_task(batcher.run(x, state, backlog)) for x, state in chunks[:3]]
        await _passes()
        calls += [asyncio.create_task(batcher.run(x, state, backlog)) for x, state in chunks[3:]]
        await _passes()
        assert batches.sizes == [] and not any(call.done() for call in calls)
        backlog.drain()
        _check_alone(chunks, await asyncio.gather(*calls))
        assert batches.sizes == [5]
        batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("newcomer", ["no backlog", "a backlog not ahead"])
def test_a_chunk_that_would_be_answered_at_once_ends_the_hold(newcomer: str) -> None:
    async def scenario() -> None:
        batches, backlog = Batches(), FakeBacklog()
        batcher = _batcher(batches)
        chunks = [_chunk(seed) for seed in range(4)]
        calls = [asyncio.create_task(batcher.run(x, state, backlog)) for x, state in chunks[:3]]
        await _passes()
        assert batches.sizes == []
        x, state = chunks[3]
        other = None if newcomer == "no backlog" else FakeBacklog(ahead=False)
        calls.append(asyncio.create_task(batcher.run(x, state, other)))
        _check_alone(chunks, await asyncio.gather(*calls))
        assert batches.sizes == [4] and backlog.is_ahead
        batcher.close()

    asyncio.run(scenario())


def test_a_full_batch_or_the_longest_hold_ends_it() -> None:
    async def scenario() -> None:
        batches, backlog = Batches(), FakeBacklog()
        batcher = _batcher(batches, max_batch_size=3)
        chunks = [_chunk(seed) for seed in range(4)]
        full = [batcher.run(x, state, backlog) for x, state in chunks[:3]]
        _check_alone(chunks[:3], await asyncio.gather(*full))  # never drained: full, so not held
        assert batches.sizes == [3]
        x, state = chunks[3]
        started = time.perf_counter()
        _check_alone(chunks[3:], [await batcher.run(x, state, backlog)])  # never drained: held HOLD_MAX_S
        assert batches.sizes == [3, 1] and time.perf_counter() - started >= HOLD_MAX_S * 0.9
        batcher.close()

    asyncio.run(scenario())


def test_an_outbox_is_ahead_while_more_than_one_answer_waits_and_wakes_as_it_drains() -> None:
    async def scenario() -> None:
        outbox: Outbox[pb.StreamResponse] = Outbox(
            StreamLimits(8, 1 << 20, 1), asyncio.get_running_loop(), end_notice
        )
        woken: list[str] = []
        outbox.on_drain(lambda: woken.append("empty"))
        assert not outbox.ahead() and woken == ["empty"]  # nothing ahead: at once
        for i in range(3):
            await outbox.reserve(10)
            outbox.answer(pb.StreamResponse(chunk=pb.ChunkResponse(request_id=str(i))), 10)
        assert outbox.ahead()
        outbox.on_drain(lambda: woken.append("drained"))
        sent = aiter(outbox)
        assert (await anext(sent)).chunk.request_id == "0" and woken == ["empty"]  # two still queued
        assert (await anext(sent)).chunk.request_id == "1" and woken == ["empty", "drained"]
        assert not outbox.ahead()
        outbox.finish()
        assert [response.chunk.request_id async for response in sent] == ["2"]
        assert woken == ["empty", "drained"]  # once

    asyncio.run(scenario())
