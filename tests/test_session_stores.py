"""The store interface's contract, held against every backend: in memory, and Redis (a real redis-server).

The same scenarios run on each, so a backend that keeps the interface keeps the session contract built on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from local_services import RedisServer, free_port, redis_server

from serving.domain.errors import StoreUnavailableError
from serving.domain.sessions.memory import InMemorySessionStore
from serving.domain.sessions.replays import EndedReplays
from serving.domain.sessions.slab import PAGE_ROWS
from serving.domain.sessions.store import (
    EVERYTHING,
    Cutoffs,
    EndReason,
    HeldBytes,
    Replay,
    Session,
    SessionStore,
    Successors,
)
from serving.server.redis_store import SWEEP_SLICE, RedisSessionStore

pytestmark = pytest.mark.timeout(60)

SHAPE = (2, 1, 4)
Scenario = Callable[[SessionStore], Coroutine[Any, Any, None]]


class StoreMetrics:
    """What the Redis store reported."""

    def __init__(self) -> None:
        self.round_trips: list[int] = []
        self.errors: list[str] = []

    def observe_store_round_trip(self, seconds: float, operations: int) -> None:
        self.round_trips.append(operations)

    def store_error(self, kind: str) -> None:
        self.errors.append(kind)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@asynccontextmanager
async def _redis_store(url: str, metrics: StoreMetrics | None = None) -> AsyncIterator[RedisSessionStore]:
    prefix = f"test:{free_port()}:"  # a namespace of its own: stores of several tests share the server
    store = await RedisSessionStore.connect(
        url, prefix=prefix, state_shape=SHAPE, idle_ttl_s=60, metrics=metrics or StoreMetrics()
    )
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "redis"])
def run_on_store(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Run a scenario against a fresh store of each kind."""

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            if request.param == "memory":
                await scenario(InMemorySessionStore(SHAPE))
                return
            server: RedisServer = request.getfixturevalue("redis")
            async with _redis_store(server.url) as store:
                await scenario(store)

        asyncio.run(main())

    return run


async def _get(store: SessionStore, session_id: str, now: float) -> Session | None:
    [session] = await store.get([session_id], now)
    return session


async def _replace(store: SessionStore, session_id: str, session: Session, steps: int) -> bool:
    [written] = await store.replace(Successors.of([(session_id, session, steps)]))
    return written


def _session(steps: int, value: float = 0.0, created_s: float = 100.0, used_s: float = 100.0) -> Session:
    outputs = np.arange(6, dtype=np.float32).reshape(2, 3) + value
    replay = Replay(bytes(range(16)), steps - 2, outputs)
    return Session(np.full(SHAPE, value, np.float32), steps, created_s, used_s, replay)


def test_create_get_replace_end_round_trip_every_field(run_on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.create("a", _session(3, 1.5)) is True
        assert await store.create("a", _session(9, 9.0)) is False  # taken: nothing written
        got = await _get(store, "a", 200.0)
        assert got is not None and got.steps == 3 and got.last_used_s == 100.0  # as before this look-up
        assert np.array_equal(got.state, np.full(SHAPE, 1.5, np.float32))
        assert got.replay is not None and got.replay.offset == 1 and got.replay.key == bytes(range(16))
        expected = np.arange(6, dtype=np.float32).reshape(2, 3) + 1.5
        assert got.replay.outputs is not None and np.array_equal(got.replay.outputs, expected)
        assert (await _get(store, "a", 300.0)).last_used_s == 200.0  # type: ignore[union-attr]
        assert len(store) == 1
        ended = await store.end("a")
        assert ended is not None and ended.steps == 3 and np.array_equal(ended.state, got.state)
        assert await _get(store, "a", 400.0) is None and await store.end("a") is None and len(store) == 0

    run_on_store(scenario)


def test_replace_is_a_compare_and_set_on_the_step_count(run_on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("s", _session(4, 1.0))
        assert await _replace(store, "s", _session(6, 2.0), 5) is False  # stale: nothing written
        assert (await _get(store, "s", 101.0)).steps == 4  # type: ignore[union-attr]
        assert await _replace(store, "s", _session(6, 2.0), 4) is True
        assert await _replace(store, "s", _session(8, 3.0), 4) is False  # the second writer of offset 4
        current = await _get(store, "s", 102.0)
        assert current is not None and current.steps == 6 and float(current.state.flat[0]) == 2.0
        assert await _replace(store, "gone", _session(2), 0) is False

    run_on_store(scenario)


def test_many_sessions_are_looked_up_and_replaced_in_one_call_each_judged_alone(
    run_on_store: Callable[[Scenario], None],
) -> None:
    """A frame's sessions: found or not, fresh or stale, each gets its own answer, in the order asked."""

    async def scenario(store: SessionStore) -> None:
        for name, steps in (("a", 2), ("b", 3), ("c", 4)):
            await store.create(name, _session(steps, float(steps)))
        found = await store.get(["c", "nobody", "a", "b"], 200.0)
        assert [None if s is None else s.steps for s in found] == [4, None, 2, 3]
        assert (await _get(store, "b", 250.0)).last_used_s == 200.0  # type: ignore[union-attr]
        written = await store.replace(
            Successors.of(
                [
                    ("a", _session(5, 5.0), 2),
                    ("b", _session(9, 9.0), 1),  # stale: nothing written for it
                    ("nobody", _session(2), 0),  # gone
                    ("c", _session(6, 6.0), 4),
                ]
            )
        )
        assert written == [True, False, False, True]
        after = await store.get(["a", "b", "c"], 300.0)  # each was used in the one call
        assert [(s.steps, float(s.state.flat[0])) for s in after if s is not None] == [
            (5, 5.0),
            (3, 3.0),
            (6, 6.0),
        ]

    run_on_store(scenario)


def test_a_frames_look_up_and_replacement_are_one_round_trip_each(redis: RedisServer) -> None:
    metrics = StoreMetrics()

    async def main() -> None:
        async with _redis_store(redis.url, metrics) as store:
            await asyncio.gather(*(store.create(f"s{i}", _session(2)) for i in range(64)))
            metrics.round_trips.clear()
            found = await store.get([f"s{i}" for i in range(64)], 200.0)
            assert all(session is not None for session in found)
            successors = Successors.of([(f"s{i}", _session(3), 2) for i in range(64)])
            assert await store.replace(successors) == [True] * 64

    asyncio.run(main())
    assert metrics.round_trips == [64, 64]


def test_expire_removes_what_is_past_the_cutoffs_and_says_why(
    run_on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("fresh", _session(2, created_s=100.0, used_s=500.0))
        await store.create("idle", _session(3, created_s=100.0, used_s=150.0))
        await store.create("old", _session(4, created_s=10.0, used_s=500.0))
        removed = [row async for rows in store.expire(Cutoffs(50.0, 200.0, 0.0)) for row in rows]
        assert sorted((session_id, s.steps, reason) for session_id, s, reason in removed) == [
            ("idle", 3, EndReason.TTL),
            ("old", 4, EndReason.LIFETIME),
        ]
        assert len(store) == 1 and await _get(store, "fresh", 600.0) is not None
        everything = [row async for rows in store.expire(EVERYTHING) for row in rows]
        assert [session_id for session_id, _, _ in everything] == ["fresh"] and len(store) == 0

    run_on_store(scenario)


def test_a_replay_kept_as_a_digest_alone_round_trips(run_on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.create("big", _session(3)._replace(replay=Replay(bytes(16), 1, None)))
        got = await _get(store, "big", 101.0)
        assert got is not None and got.replay == Replay(bytes(16), 1, None)

    run_on_store(scenario)


def test_least_recent_follows_use(run_on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.least_recent() is None
        for i, name in enumerate("abc"):
            await store.create(name, _session(2, used_s=100.0 + i))
        assert await store.least_recent() == "a"
        await _get(store, "a", 200.0)
        assert await store.least_recent() == "b"

    run_on_store(scenario)


def test_expire_goes_in_slices_over_many_sessions(redis: RedisServer) -> None:
    async def main() -> None:
        async with _redis_store(redis.url) as store:
            await asyncio.gather(*(store.create(f"s{i}", _session(2)) for i in range(SWEEP_SLICE + 5)))
            slices = [len(rows) async for rows in store.expire(Cutoffs(0.0, 1000.0, 0.0))]
            assert slices == [SWEEP_SLICE, 5] and len(store) == 0

    asyncio.run(main())


def test_calls_made_together_share_one_round_trip(redis: RedisServer) -> None:
    """The chunks of one batch commit together: one pipeline, not one round trip each."""
    metrics = StoreMetrics()

    async def main() -> None:
        async with _redis_store(redis.url, metrics) as store:
            metrics.round_trips.clear()
            results = await asyncio.gather(*(store.create(f"s{i}", _session(2)) for i in range(64)))
            assert all(results)

    asyncio.run(main())
    assert metrics.round_trips == [64]


def test_an_unreachable_redis_is_a_store_unavailable_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(StoreUnavailableError, match=r"cannot reach redis://127\.0\.0\.1:\d+/0"):
            await RedisSessionStore.connect(
                f"redis://127.0.0.1:{free_port()}/0",
                prefix="x:",
                state_shape=SHAPE,
                idle_ttl_s=60,
                metrics=StoreMetrics(),
            )

    asyncio.run(main())


def test_calls_fail_as_unavailable_while_redis_is_down_and_work_once_it_is_back(tmp_path: Path) -> None:
    metrics = StoreMetrics()
    with redis_server(tmp_path, durable=True) as server:

        async def main() -> None:
            async with _redis_store(server.url, metrics) as store:
                await store.create("kept", _session(5, 2.0))
                server.stop()
                with pytest.raises(StoreUnavailableError, match="session store is unreachable"):
                    await _replace(store, "kept", _session(7, 3.0), 5)
                server.start()
                kept = await _get(store, "kept", 101.0)
                assert kept is not None and kept.steps == 5 and float(kept.state.flat[0]) == 2.0
                assert await _replace(store, "kept", _session(7, 3.0), 5) is True

        asyncio.run(main())
    assert "unreachable" in metrics.errors


def test_the_memory_store_counts_the_bytes_it_holds_as_sessions_come_change_and_go() -> None:
    async def scenario() -> None:
        store = InMemorySessionStore(SHAPE)
        assert store.held_bytes() == HeldBytes(0, 0)
        each = _session(3).replay.nbytes  # type: ignore[union-attr]
        page = PAGE_ROWS * int(np.prod(SHAPE)) * 4
        for session_id in ("a", "b", "c"):
            await store.create(session_id, _session(3, used_s=100.0))
        assert store.held_bytes() == HeldBytes(page, 3 * each)
        await _replace(store, "a", _session(5)._replace(replay=Replay(bytes(16), 3, None)), 3)
        assert store.held_bytes().replay == 2 * each  # a's response over the budget: a digest alone
        await _get(store, "c", 300.0)  # c used after the replay cutoff below: keeps its replay
        assert [rows async for rows in store.expire(Cutoffs(0.0, 0.0, 200.0))] == [[]]
        assert store.held_bytes().replay == each  # b's replay dropped: the session lives on
        await store.end("c")
        assert store.held_bytes() == HeldBytes(page, 0)  # the page stays allocated for the next sessions

    asyncio.run(scenario())


def test_a_replacement_across_slab_pages_writes_every_row_and_frees_the_old_ones() -> None:
    """The memory store copies a frame's successors into the slab in one call per page: rows that fall on
    two pages each get their own state, and the rows they replaced are free again."""

    async def scenario() -> None:
        store = InMemorySessionStore(SHAPE)
        count = PAGE_ROWS + 8  # the successors' rows take the first page's last free ones and the next page's
        for i in range(count):
            await store.create(f"s{i}", _session(1, float(i)))
        successors = Successors.of([(f"s{i}", _session(2, float(-i)), 1) for i in range(count)])
        assert await store.replace(successors) == [True] * count
        found = await store.get([f"s{i}" for i in range(count)], 200.0)
        assert [(s.steps, float(s.state.flat[0])) for s in found if s] == [
            (2, float(-i)) for i in range(count)
        ]
        assert store.held_bytes().state == 3 * PAGE_ROWS * int(np.prod(SHAPE)) * 4
        for i in range(count):  # the freed rows are taken again: no further page
            await store.create(f"t{i}", _session(1))
        assert store.held_bytes().state == 3 * PAGE_ROWS * int(np.prod(SHAPE)) * 4

    asyncio.run(scenario())


def test_ended_replays_count_their_bytes_until_dropped_by_count_time_or_a_restart() -> None:
    replays = EndedReplays(window_s=10.0, max_kept=2)
    kept = _session(3).replay
    assert kept is not None
    for i, session_id in enumerate(("a", "b", "c")):
        replays.keep(session_id, kept, 3, now=float(i))
    assert replays.held_bytes == 2 * kept.nbytes and replays.get("a", 2.0) is None  # a: past the count
    replays.keep("b", Replay(bytes(16), 1, None), 3, now=3.0)  # b again, a digest alone
    assert replays.held_bytes == kept.nbytes
    replays.discard("c")  # c starts over
    assert replays.held_bytes == 0
    replays.keep("d", kept, 3, now=4.0)
    replays.forget_expired(now=14.5)  # b (3.0) and d (4.0) are past the 10 s window
    assert replays.held_bytes == 0 and replays.get("d", 14.5) is None
