"""The in-memory session store, the default backend: a dict in least-recently-used order over a state slab.

Lean per idle session: an entry holds its state's slab slot, not an array (see `slab`), and the dict's order
is the LRU order (a use moves a session to the end), so no other index is kept. Not thread-safe: the event
loop owns it. No call suspends: on one loop, each is atomic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import numpy as np

from serving.domain.sessions.slab import StateSlab
from serving.domain.sessions.store import Cutoffs, Expired, HeldBytes, Replay, Session, Successors

# Sessions `expire` looks at before it yields: a slice holds the event loop a few milliseconds, where a
# whole pass over 100k sessions would hold it for tens (docs/benchmarks.md).
SWEEP_SLICE = 2000


class _Entry:
    """A stored session: `Session` with a slab slot in place of the state array. Changed in place (a look-up
    and a replacement write every chunk's session: no new record each time); never handed out."""

    __slots__ = ("created_s", "last_used_s", "replay", "slot", "steps")

    def __init__(self, slot: int, session: Session) -> None:
        self.slot: int = slot
        self.steps: int = session.steps
        self.created_s: float = session.created_s
        self.last_used_s: float = session.last_used_s
        self.replay: Replay | None = session.replay


class InMemorySessionStore:
    """Sessions of one process, lost with it. States are float32 rows of `state_shape`."""

    durable = False

    def __init__(self, state_shape: tuple[int, ...]) -> None:
        self._entries: dict[str, _Entry] = {}
        self._shape = state_shape
        self._slab = StateSlab(state_shape)
        self._replay_bytes = 0  # of the entries' replay outputs, kept as they change: read at every scrape

    async def get(self, session_ids: Sequence[str], now: float) -> list[Session | None]:
        """Each session as it was before this look-up (None: none), which is a use: its last use becomes
        `now`."""
        entries = self._entries
        found: list[Session | None] = []
        for session_id in session_ids:
            entry = entries.pop(session_id, None)
            if entry is None:
                found.append(None)
                continue
            entries[session_id] = entry  # re-inserted last: most recent
            view = self._slab.view(entry.slot)
            found.append(Session(view, entry.steps, entry.created_s, entry.last_used_s, entry.replay))
            entry.last_used_s = now
        return found

    async def create(self, session_id: str, session: Session) -> bool:
        """Add `session` unless `session_id` is taken; False (nothing written) when it is."""
        if session_id in self._entries:
            return False
        self._check_shape(session.state)
        self._entries[session_id] = _Entry(self._slab.store(session.state), session)
        self._replay_bytes += _nbytes(session.replay)
        return True

    async def replace(self, successors: Successors) -> list[bool]:
        """Swap in each successor whose stored session has consumed its expected steps; False (nothing
        written for it) for the others. The states are copied in one slab call."""
        entries, session_ids = self._entries, successors.session_ids
        current = [entries.get(session_id) for session_id in session_ids]
        rows = [
            row
            for row, (entry, expected) in enumerate(zip(current, successors.expected, strict=True))
            if entry is not None and entry.steps == expected
        ]
        written = [False] * len(session_ids)
        if not rows:
            return written
        states = successors.states if len(rows) == len(session_ids) else successors.states[rows]
        self._check_shape(states[0])
        # New rows, the old ones released after: a reader of an old state never sees it change mid-chunk.
        slots = self._slab.store_many(states)
        old_slots = []
        for row, slot in zip(rows, slots, strict=True):
            session_id, entry = session_ids[row], current[row]
            assert entry is not None  # a row of `rows`
            del entries[session_id]
            entries[session_id] = entry  # last: most recent
            old_slots.append(entry.slot)
            replay = successors.replays[row]
            self._replay_bytes += _nbytes(replay) - _nbytes(entry.replay)
            entry.slot, entry.steps, entry.replay = slot, successors.steps[row], replay
            entry.created_s, entry.last_used_s = successors.created_s[row], successors.last_used_s[row]
            written[row] = True
        self._slab.release(*old_slots)
        return written

    async def end(self, session_id: str) -> Session | None:
        """Remove a session and return it (its state a copy); None when there was none."""
        entry = self._entries.get(session_id)
        return None if entry is None else self._remove(session_id, entry)

    async def expire(self, cutoffs: Cutoffs) -> AsyncIterator[list[Expired]]:
        """Remove the sessions past `cutoffs`, `SWEEP_SLICE` at a time; drop replays past `cutoffs.replay_s`.

        It visits the sessions live when it began, each looked up again when its slice comes: one used or
        ended in between is judged as it is then.
        """
        session_ids = list(self._entries)
        for first in range(0, len(session_ids), SWEEP_SLICE):
            removed: list[Expired] = []
            for session_id in session_ids[first : first + SWEEP_SLICE]:
                entry = self._entries.get(session_id)
                if entry is None:
                    continue
                reason = cutoffs.reason(entry.created_s, entry.last_used_s)
                if reason is not None:
                    removed.append((session_id, self._remove(session_id, entry), reason))
                elif entry.replay is not None and entry.last_used_s < cutoffs.replay_s:
                    self._replay_bytes -= entry.replay.nbytes
                    entry.replay = None
            yield removed

    async def least_recent(self) -> str | None:
        """The id of the session used longest ago; None when there is none."""
        return next(iter(self._entries), None)

    def __len__(self) -> int:
        """Live sessions."""
        return len(self._entries)

    def held_bytes(self) -> HeldBytes:
        """The slab's pages, and the live sessions' kept responses."""
        return HeldBytes(self._slab.held_bytes, self._replay_bytes)

    def _check_shape(self, state: np.ndarray) -> None:
        if state.shape != self._shape or state.dtype != np.float32:
            raise ValueError(f"state must be float32 {self._shape}, got {state.dtype} {state.shape}")

    def _remove(self, session_id: str, entry: _Entry) -> Session:
        del self._entries[session_id]
        state = self._slab.view(entry.slot).copy()
        session = Session(state, entry.steps, entry.created_s, entry.last_used_s, entry.replay)
        self._forget(entry)
        return session

    def _forget(self, entry: _Entry) -> None:
        """Release what a removed entry held."""
        self._slab.release(entry.slot)
        self._replay_bytes -= _nbytes(entry.replay)


def _nbytes(replay: Replay | None) -> int:
    return 0 if replay is None else replay.nbytes
