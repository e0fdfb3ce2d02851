"""The session contract in the domain layer, with a fake runner: ordering, atomicity, notices, shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest
from fakes import FAKE_HIDDEN, FAKE_LAYERS, FAKE_SPEC, FAKE_VOCABULARY, FakeClock, FakeRunner
from prometheus_client import CollectorRegistry

from serving.domain.batcher import Batcher
from serving.domain.chunks import (
    Chunk,
    ChunkResult,
    OutputMode,
    ServedModel,
    chunk_digest,
    continued_digests,
)
from serving.domain.engine import Engine
from serving.domain.errors import (
    InvalidChunkError,
    InvalidSessionIdError,
    OffsetMismatchError,
    SessionNotFoundError,
    ShuttingDownError,
)
from serving.domain.frames import Frame, FrameOutcome
from serving.domain.sessions.lifecycle import SessionLimits, Sessions
from serving.domain.sessions.memory import InMemorySessionStore
from serving.domain.sessions.store import EndReason, SessionEnd
from serving.server.metrics import ConveyorMetrics

pytestmark = pytest.mark.timeout(30)

_T = TypeVar("_T")
LAYERS, HIDDEN, VOCABULARY = FAKE_LAYERS, FAKE_HIDDEN, FAKE_VOCABULARY


class Harness:
    """An engine over a real store and batcher with a fake runner, and what it reported."""

    def __init__(self, runner: FakeRunner, clock: FakeClock) -> None:
        self.registry = CollectorRegistry()
        metrics = ConveyorMetrics(self.registry)
        limits = SessionLimits(idle_ttl_s=60, lifetime_s=3600, max_sessions=100, evict_lru=False)
        model = ServedModel(FAKE_SPEC, 16, 60)
        self.sessions = Sessions(InMemorySessionStore(model.state_shape), limits, clock=clock)
        self.batcher = Batcher(runner, max_batch_size=64, max_delay_ms=0, inline_max_ms=0.5, metrics=metrics)
        self.engine = Engine(model, self.sessions, self.batcher, metrics.for_version(("fake", "1")))

    def sample(self, name: str, **labels: str) -> float | None:
        """A sample of the engine's version's metrics."""
        return self.registry.get_sample_value(name, {"model": "fake", "version": "1", **labels})


def _run(scenario: Callable[[Harness], Awaitable[_T]], runner: FakeRunner | None = None,
         clock: FakeClock | None = None) -> _T:  # fmt: skip
    async def main() -> _T:
        harness = Harness(runner or FakeRunner(), clock or FakeClock())
        try:
            return await scenario(harness)
        finally:
            harness.batcher.close()

    return asyncio.run(main())


def _expected(x: np.ndarray) -> np.ndarray:
    zeros = np.zeros((1, 2 * LAYERS * HIDDEN), np.float32)
    return np.asarray(FakeRunner().run(x[None], zeros)[0][0])


X = np.arange(12, dtype=np.int64) % VOCABULARY


def _frame(chunks: list[Chunk]) -> Frame:
    """These chunks (of one length, one output mode) as a frame: the columns the servicer reads."""
    return Frame(
        [chunk.session_id for chunk in chunks],
        np.array([chunk.inputs for chunk in chunks]),
        [chunk.offset for chunk in chunks],
        [chunk.start for chunk in chunks],
        [chunk.end for chunk in chunks],
        [chunk.reset for chunk in chunks],
        [chunk.snapshot for chunk in chunks],
        chunks[0].outputs,
    )


def test_concurrent_chunks_of_one_session_apply_in_arrival_order() -> None:
    async def scenario(h: Harness) -> list[np.ndarray]:
        cuts = [(0, 3), (3, 4), (4, 9), (9, 12)]
        chunks = [Chunk("ordered", X[a:b], a, start=a == 0) for a, b in cuts]
        results = await asyncio.gather(*(h.engine.step(chunk) for chunk in chunks))
        return [result.outputs for result in results]

    assert np.array_equal(np.concatenate(_run(scenario)), _expected(X))


class FailingRunner(FakeRunner):
    """Fails while `broken` is set."""

    broken = False

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.broken:
            raise RuntimeError("the runtime failed")
        return super().run(x, states)


def test_a_failed_run_leaves_the_session_as_it_was() -> None:
    runner = FailingRunner()

    async def scenario(h: Harness) -> np.ndarray:
        first = await h.engine.step(Chunk("atomic", X[:5], 0, start=True))
        runner.broken = True
        with pytest.raises(RuntimeError):
            await h.engine.step(Chunk("atomic", X[5:], 5))
        runner.broken = False
        assert (await h.sessions.get("atomic")).steps == 5
        second = await h.engine.step(Chunk("atomic", X[5:], 5))
        return np.concatenate([first.outputs, second.outputs])

    assert np.array_equal(_run(scenario, runner), _expected(X))


def test_a_watcher_hears_of_the_end_after_the_chunk_that_ended_it() -> None:
    async def scenario(h: Harness) -> tuple[list[SessionEnd], list[SessionEnd]]:
        notices: list[SessionEnd] = []
        result = await h.engine.step(Chunk("short", X[:4], 0, start=True, end=True), notices.append)
        assert result.ended and result.steps == 4
        before = list(notices)  # the response is handed back first
        await asyncio.sleep(0)
        return before, notices

    before, after = _run(scenario)
    assert before == [] and [(n.session_id, n.reason, n.steps) for n in after] == [
        ("short", EndReason.END, 4)
    ]


def test_metrics_count_sessions_and_timesteps_not_replays() -> None:
    async def scenario(h: Harness) -> Harness:
        await h.engine.step(Chunk("counted", X[:4], 0, start=True))
        await h.engine.step(Chunk("counted", X[:4], 0, start=True))  # a retry: replayed
        await h.engine.step(Chunk("counted", X[4:6], 4))
        with pytest.raises(OffsetMismatchError):
            await h.engine.step(Chunk("counted", X[4:6], 5))
        assert await h.engine.end_session("counted") == 6
        return h

    h = _run(scenario)
    assert h.sample("conveyor_sessions_started_total") == 1
    assert h.sample("conveyor_timesteps_total") == 6
    assert h.sample("conveyor_sessions_ended_total", reason="end") == 1
    assert h.sample("conveyor_session_timesteps_sum") == 6


class GatedRunner(FakeRunner):
    """Each run waits for `gate`; `entered` tells the test a run has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    def run(self, x: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        return super().run(x, states)


def test_close_lets_in_flight_chunks_finish_then_ends_every_session() -> None:
    runner = GatedRunner()

    async def scenario(h: Harness) -> list[SessionEnd]:
        ended: list[SessionEnd] = []
        h.sessions.add_listener(ended.append)
        in_flight = asyncio.create_task(h.engine.step(Chunk("busy", X[:4], 0, start=True)))
        await asyncio.to_thread(runner.entered.wait, 10)
        closing = asyncio.create_task(h.engine.close(grace_s=10))
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDownError):
            await h.engine.step(Chunk("late", X[:4], 0, start=True))
        runner.gate.set()
        assert (await in_flight).steps == 4
        await closing
        return ended

    ended = _run(scenario, runner)
    assert [(e.session_id, e.reason) for e in ended] == [("busy", EndReason.SHUTDOWN)]


def test_a_chunk_still_running_after_the_grace_period_is_not_committed() -> None:
    runner = GatedRunner()

    async def scenario(h: Harness) -> None:
        in_flight = asyncio.create_task(h.engine.step(Chunk("slow", X[:4], 0, start=True)))
        await asyncio.to_thread(runner.entered.wait, 10)
        await h.engine.close(grace_s=0.01)
        runner.gate.set()
        with pytest.raises(ShuttingDownError):
            await in_flight
        assert len(h.sessions) == 0

    _run(scenario, runner)


def test_the_sweeper_ends_expired_sessions_unprompted() -> None:
    clock = FakeClock()

    async def scenario(h: Harness) -> list[SessionEnd]:
        notices: list[SessionEnd] = []
        await h.engine.step(Chunk("forgotten", X[:2], 0, start=True), notices.append)
        h.sessions.start_sweeper(0.005)
        clock.advance(61)
        while not notices:
            await asyncio.sleep(0.005)
        await h.engine.close(grace_s=0)
        return notices

    notices = _run(scenario, clock=clock)
    assert [(n.session_id, n.reason) for n in notices] == [("forgotten", EndReason.TTL)]


def test_frames_sharing_sessions_in_any_order_apply_in_arrival_order_and_run_as_one_batch() -> None:
    """Frames and single chunks, concurrently, on overlapping sessions listed in different orders: no frame
    waits on another in a circle, each session's chunks apply in arrival order, and a frame's runnable
    chunks run as one batch."""
    runner = FakeRunner()

    async def scenario(h: Harness) -> dict[str, list[np.ndarray]]:
        ids = ["a", "b", "c"]
        got: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}

        def keep(outcome: FrameOutcome, order: list[str]) -> None:
            assert not outcome.errors, outcome.errors
            for sid, outputs in zip(order, outcome.outputs, strict=True):
                got[sid].append(outputs)

        keep(await h.engine.step_frame(_frame([Chunk(sid, X[:2], 0, start=True) for sid in ids])), ids)
        assert runner.calls[-1] == (3, 2)  # one batch of three rows
        backwards = ids[::-1]
        second = h.engine.step_frame(_frame([Chunk(sid, X[2:5], 2) for sid in ids]))
        third = h.engine.step_frame(_frame([Chunk(sid, X[5:8], 5) for sid in backwards]))
        alone = h.engine.step(Chunk("b", X[8:10], 8))
        frame_2, frame_3, single = await asyncio.gather(second, third, alone)
        keep(frame_2, ids)
        keep(frame_3, backwards)
        got["b"].append(single.outputs)
        last = [Chunk("a", X[8:10], 8), Chunk("b", X[10:12], 10), Chunk("c", X[8:10], 8)]
        keep(await h.engine.step_frame(_frame(last)), ids)
        return got

    for sid, parts in _run(scenario, runner).items():
        steps = 12 if sid == "b" else 10
        assert np.array_equal(np.concatenate(parts), _expected(X)[:steps]), sid


def test_a_frames_bad_session_fails_alone_and_a_repeated_session_is_refused() -> None:
    async def scenario(h: Harness) -> FrameOutcome:
        await h.engine.step_frame(_frame([Chunk(sid, X[:2], 0, start=True) for sid in ("a", "b")]))
        return await h.engine.step_frame(
            _frame([Chunk("a", X[2:4], 2), Chunk("b", X[2:4], 7), Chunk("a", X[2:4], 2),
                    Chunk("nobody", X[2:4], 2), Chunk("c", X[2:4], 0, start=True)])
        )  # fmt: skip

    outcome = _run(scenario)
    b, a_again, nobody = (outcome.errors.get(row) for row in (1, 2, 3))
    assert sorted(outcome.errors) == [1, 2, 3] and outcome.steps == [4, -1, -1, -1, 2]
    assert isinstance(b, OffsetMismatchError) and "resend from offset 2" in str(b)
    assert isinstance(a_again, InvalidChunkError) and "appears more than once" in str(a_again)
    assert isinstance(nobody, SessionNotFoundError) and "'nobody'" in str(nobody)
    assert not outcome.outputs[1:4].any()  # a failed row's outputs are zeros


def test_a_frames_rows_with_values_the_model_cannot_take_fail_alone_and_the_rest_run() -> None:
    """The frame's values are checked as one block; the rows that fail it get the message a chunk alone gets,
    and the others run as they would alone."""
    bad = np.array([1, VOCABULARY, 2])  # an id past the vocabulary

    async def scenario(h: Harness) -> tuple[FrameOutcome, str]:
        frame = [Chunk("v1", X[:3], 0, start=True), Chunk("v2", bad, 0, start=True),
                 Chunk("v3", X[:3], 0, start=True), Chunk("v4", -bad, 0, start=True)]  # fmt: skip
        with pytest.raises(InvalidChunkError) as alone:
            await h.engine.step(Chunk("solo", bad, 0, start=True))
        return await h.engine.step_frame(_frame(frame)), str(alone.value)

    outcome, solo = _run(scenario)
    v2, v4 = outcome.errors[1], outcome.errors[3]
    assert sorted(outcome.errors) == [1, 3]
    assert str(v2) == solo and "outside the vocabulary" in str(v4)
    for good in (0, 2):
        assert np.array_equal(outcome.outputs[good], _expected(X)[:3])


def test_a_retry_of_the_chunk_that_started_and_ended_its_session_is_replayed_not_run_again() -> None:
    """Found by the soak: a start + end chunk sent again started a new session and ran the model twice."""
    runner = FakeRunner()

    async def scenario(h: Harness) -> tuple[ChunkResult, ChunkResult]:
        whole = Chunk("once", X[:5], 0, start=True, end=True)
        return await h.engine.step(whole), await h.engine.step(whole)

    first, again = _run(scenario, runner)
    assert (first.replayed, again.replayed, again.steps, again.ended) == (False, True, 5, True)
    assert np.array_equal(again.outputs, first.outputs) and len(runner.calls) == 1


def test_a_chunks_digest_is_blake2b_of_its_flags_inputs_and_snapshot() -> None:
    """The digest that recognises a repeat is kept in a shared store: servers of different versions, sharing
    it during a rolling deploy, must compute the same one for the same chunk."""
    chunks = [
        Chunk("a", X[:3], 4),
        Chunk("a", X[:1], 0, start=True, reset=True, snapshot=b"blob", outputs=OutputMode.LAST),
        Chunk("a", X[:2], 0, start=True, end=True),
    ]
    flags = [0, 1 | 4 | 8, 1 | 2]
    for chunk, flag in zip(chunks, flags, strict=True):
        payload = bytes((flag,)) + chunk.inputs.tobytes() + chunk.snapshot
        assert chunk_digest(chunk) == hashlib.blake2b(payload, digest_size=16).digest()
    block = np.stack([X[:3], X[3:6], X[6:9]])  # a frame's continuing rows: their digests in one pass
    for mode in OutputMode:
        rows = [Chunk("a", row, 3, outputs=mode) for row in block]
        assert continued_digests(block, mode) == [chunk_digest(chunk) for chunk in rows]


def test_a_frames_session_id_holding_a_newline_fails_alone() -> None:
    """A frame's ids are checked by one match over them joined by newlines: an id holding one must not pass
    as two."""

    async def scenario(h: Harness) -> FrameOutcome:
        return await h.engine.step_frame(_frame([Chunk(sid, X[:2], 0, start=True) for sid in ("a", "b\nc")]))

    outcome = _run(scenario)
    assert list(outcome.errors) == [1] and outcome.steps[0] == 2
    assert isinstance(outcome.errors[1], InvalidSessionIdError)
