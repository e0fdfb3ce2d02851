"""The in-memory session store with an injected clock: lifecycle, capacity, snapshots, memory per session."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from serving_harness import FakeClock

from serving.errors import (
    CapacityExceededError,
    InvalidSnapshotError,
    SessionNotFoundError,
    SnapshotModelMismatchError,
)
from serving.sessions import SWEEP_SLICE, EndReason, InMemorySessionStore, Replay, SessionEnd, StoreLimits

pytestmark = pytest.mark.timeout(30)

LAYERS, HIDDEN = 2, 8
FINGERPRINT = "ab" * 32
LIMITS = StoreLimits(idle_ttl_s=60, lifetime_s=3600, max_sessions=3, evict_lru=False)


def _store(
    clock: FakeClock, limits: StoreLimits = LIMITS, hidden: int = HIDDEN, fingerprint: str = FINGERPRINT
) -> tuple[InMemorySessionStore, list[SessionEnd]]:
    store = InMemorySessionStore(
        layers=LAYERS, hidden=hidden, fingerprint=fingerprint, limits=limits, clock=clock
    )
    ended: list[SessionEnd] = []
    store.add_listener(ended.append)
    return store, ended


def _state(value: float, hidden: int = HIDDEN) -> np.ndarray:
    return np.full((2, LAYERS, hidden), value, np.float32)


def _replay(offset: int = 0) -> Replay:
    return Replay(b"k" * 16, offset, np.zeros((1, 4), np.float32))


def test_put_then_get_returns_a_read_only_state_and_counts() -> None:
    store, _ = _store(FakeClock())
    assert store.put("a", _state(1.0), 5, _replay(), new=True) is True
    session = store.get("a")
    assert session.steps == 5 and np.array_equal(session.state, _state(1.0))
    assert not session.state.flags.writeable
    assert store.put("a", _state(2.0), 9, _replay(5), new=False) is False
    assert store.get("a").steps == 9 and len(store) == 1
    assert store.state_bytes() == 2 * LAYERS * HIDDEN * 4


def test_initial_state_is_zeros_at_step_zero() -> None:
    store, _ = _store(FakeClock())
    state, steps = store.initial(b"")
    assert steps == 0 and state.shape == (2, LAYERS, HIDDEN) and not state.any()


def test_idle_sessions_expire_on_access_and_on_sweep() -> None:
    clock = FakeClock()
    store, ended = _store(clock)
    store.put("used", _state(0), 1, _replay(), new=True)
    store.put("idle", _state(0), 2, _replay(), new=True)
    clock.advance(40)
    store.get("used")  # a use restarts the idle time
    clock.advance(40)
    list(store.sweep())
    assert [(e.session_id, e.reason, e.steps) for e in ended] == [("idle", EndReason.TTL, 2)]
    clock.advance(61)
    assert store.find("used") is None
    assert ended[-1].session_id == "used" and ended[-1].reason is EndReason.TTL
    with pytest.raises(SessionNotFoundError, match="'used' expired or never started"):
        store.get("used")


def test_a_session_ended_by_its_last_chunk_keeps_that_replay_for_the_window_only() -> None:
    clock = FakeClock()
    store, _ = _store(clock, replace(LIMITS, replay_window_s=20))
    for session_id in ("kept", "plain", "reused"):
        store.put(session_id, _state(0), 7, _replay(3), new=True)
    store.end("kept", EndReason.END, keep_replay=True)
    store.end("plain", EndReason.END)
    store.end("reused", EndReason.END, keep_replay=True)
    store.put("reused", _state(0), 2, _replay(0), new=True)  # the id starts a new session
    kept = store.ended_replay("kept")
    assert kept is not None and (kept.replay.offset, kept.steps) == (3, 7)
    assert store.ended_replay("plain") is None and store.ended_replay("reused") is None
    clock.advance(21)
    list(store.sweep())
    assert store.ended_replay("kept") is None


def test_ended_replays_are_bounded_by_the_session_capacity() -> None:
    store, _ = _store(FakeClock())  # max_sessions 3
    for i in range(5):
        store.put(f"s{i}", _state(0), 1, _replay(), new=True)
        store.end(f"s{i}", EndReason.END, keep_replay=True)
    assert [i for i in range(5) if store.ended_replay(f"s{i}") is not None] == [2, 3, 4]


def test_a_sweep_pauses_between_slices_and_judges_each_session_as_it_is_then() -> None:
    clock = FakeClock()
    store, ended = _store(clock, replace(LIMITS, max_sessions=2 * SWEEP_SLICE))
    for i in range(SWEEP_SLICE + 2):
        store.put(f"s{i}", _state(0), 1, _replay(), new=True)
    clock.advance(LIMITS.idle_ttl_s + 1)
    sweep = store.sweep()
    next(sweep)
    assert len(ended) == SWEEP_SLICE  # one slice done, then a pause for other work
    store.put(f"s{SWEEP_SLICE}", _state(1), 2, _replay(), new=False)  # a chunk ran for it in the pause
    list(sweep)
    assert [e.session_id for e in ended[SWEEP_SLICE:]] == [f"s{SWEEP_SLICE + 1}"]
    assert len(store) == 1


def test_the_sweep_drops_replay_caches_past_the_replay_window_and_keeps_lru_order() -> None:
    clock = FakeClock()
    store, ended = _store(clock, StoreLimits(60, 3600, 3, evict_lru=True, replay_window_s=10))
    store.put("old", _state(0), 1, _replay(), new=True)
    store.put("new", _state(0), 1, _replay(), new=True)
    clock.advance(11)
    store.get("new")
    list(store.sweep())
    assert store.get("new").replay is not None
    assert store.get("old").replay is None and store.get("old").steps == 1 and not ended
    store.get("new")  # "old" was used before "new": it is the one evicted
    store.put("a", _state(0), 1, _replay(), new=True)
    store.put("b", _state(0), 1, _replay(), new=True)
    assert [e.session_id for e in ended] == ["old"]


def test_sessions_end_at_their_lifetime_however_busy() -> None:
    clock = FakeClock()
    store, ended = _store(clock)
    store.put("busy", _state(0), 1, _replay(), new=True)
    uses = 0
    while store.find("busy") is not None:
        clock.advance(59)
        uses += 1
    assert uses == 62  # 62 * 59 s is the first age past the 3600 s lifetime
    assert [(e.reason, e.duration_s) for e in ended] == [(EndReason.LIFETIME, 62 * 59)]


def test_at_capacity_a_new_session_is_refused() -> None:
    store, _ = _store(FakeClock())
    for name in "abc":
        store.put(name, _state(0), 1, _replay(), new=True)
    with pytest.raises(CapacityExceededError, match="capacity of 3 sessions"):
        store.check_capacity("d")
    with pytest.raises(CapacityExceededError):
        store.put("d", _state(0), 1, _replay(), new=True)
    store.check_capacity("a")  # a restart of a live session takes no extra room
    store.put("a", _state(0), 1, _replay(), new=True)
    assert len(store) == 3


def test_at_capacity_the_least_recently_used_session_can_be_evicted() -> None:
    store, ended = _store(FakeClock(), StoreLimits(60, 3600, 3, evict_lru=True))
    for name in "abc":
        store.put(name, _state(0), 1, _replay(), new=True)
    store.get("a")
    store.check_capacity("d")
    store.put("d", _state(0), 1, _replay(), new=True)
    assert [(e.session_id, e.reason) for e in ended] == [("b", EndReason.CAPACITY)]
    assert store.find("b") is None and store.find("a") is not None


def test_committing_a_session_that_ended_meanwhile_is_not_found() -> None:
    store, _ = _store(FakeClock())
    store.put("gone", _state(0), 1, _replay(), new=True)
    assert store.end("gone", EndReason.END).steps == 1
    with pytest.raises(SessionNotFoundError):
        store.put("gone", _state(0), 2, _replay(1), new=False)


def test_end_all_tells_listeners_with_the_reason() -> None:
    store, ended = _store(FakeClock())
    store.put("x", _state(0), 3, _replay(), new=True)
    store.put("y", _state(0), 4, _replay(), new=True)
    store.end_all(EndReason.SHUTDOWN)
    assert len(store) == 0 and {(e.session_id, e.reason) for e in ended} == {
        ("x", EndReason.SHUTDOWN),
        ("y", EndReason.SHUTDOWN),
    }


def test_a_snapshot_restores_state_and_steps() -> None:
    source, _ = _store(FakeClock())
    state = np.random.default_rng(0).standard_normal((2, LAYERS, HIDDEN)).astype(np.float32)
    source.put("s", state, 42, _replay(), new=True)
    blob, steps = source.snapshot("s")
    target, _ = _store(FakeClock())
    restored, restored_steps = target.initial(blob)
    assert (steps, restored_steps) == (42, 42) and np.array_equal(restored, state)


def test_a_snapshot_of_another_model_is_refused_as_such() -> None:
    source, _ = _store(FakeClock(), fingerprint="cd" * 32)
    source.put("s", _state(1), 3, _replay(), new=True)
    blob, _ = source.snapshot("s")
    target, _ = _store(FakeClock())
    with pytest.raises(
        SnapshotModelMismatchError, match="taken on model cdcdcdcdcdcd but this server runs abab"
    ):
        target.initial(blob)


def test_damaged_or_foreign_snapshots_are_invalid() -> None:
    store, _ = _store(FakeClock())
    store.put("s", _state(1), 3, _replay(), new=True)
    blob, _ = store.snapshot("s")
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    version_2 = blob[:7] + b"\x02" + blob[8:]
    cases = {
        b"": None,  # empty means no snapshot: zeros
        b"garbage": "not a Conveyor snapshot",
        blob[:-1]: "truncated or corrupt",
        bytes(flipped): "truncated or corrupt",
        version_2: "format version 2 is not supported",
    }
    for bad, message in cases.items():
        if message is None:
            assert store.initial(bad)[1] == 0
            continue
        with pytest.raises(InvalidSnapshotError, match=message):
            store.initial(bad)
    wider, _ = _store(FakeClock(), hidden=HIDDEN + 1)
    with pytest.raises(InvalidSnapshotError, match="state for 2 layers x 8, not 2 x 9"):
        wider.initial(blob)


@pytest.mark.parametrize(("layers", "hidden"), [(2, 128), (1, 32)])
def test_memory_per_idle_session(layers: int, hidden: int) -> None:
    """Bytes held per idle session, measured with tracemalloc, against the raw state size.

    Target (issue 4): <= 1.5 x raw + 512 bytes, raw = 2 * layers * hidden * 4. An idle session here has taken
    one chunk with LAST outputs of 4 values, so it also holds its replay cache (the key and that response).
    """
    count = 2000
    limits = StoreLimits(60, 3600, count, evict_lru=False)
    store = InMemorySessionStore(layers=layers, hidden=hidden, fingerprint=FINGERPRINT, limits=limits)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(count):
        replay = Replay(i.to_bytes(16, "little"), 0, np.ones((1, 4), np.float32))
        store.put(f"session-{i:08d}", np.ones((2, layers, hidden), np.float32), 1, replay, new=True)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_session = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    raw = 2 * layers * hidden * 4
    print(f"layers={layers} hidden={hidden}: {per_session:.0f} bytes per idle session, raw state {raw}")
    assert per_session <= 1.5 * raw + 512
