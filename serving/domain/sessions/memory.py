"""The in-memory session store, the default backend: a dict in least-recently-used order over a state slab.

Lean per idle session: an entry holds its state's slab slot, not an array (see `slab`), and the dict's order
is the LRU order (a use moves a session to the end), so no other index is kept. Not thread-safe: the event
loop owns it. No call suspends: on one loop, each is atomic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import numpy as np

from serving.domain.sessions.slab import StateSlab
from serving.domain.sessions.store import Cutoffs, Expired, HeldBytes, Replacement, Replay, Session

# Sessions `expire` looks at before it yields: 1-4 ms on the bench host, where a whole pass over 100k
# sessions takes 40-160 ms (160 when it drops their replays).
SWEEP_SLICE = 2000


class _Entry(NamedTuple):
    """A stored session: `Session` with a slab slot in place of the state array."""

    slot: int
    steps: int
    created_s: float
    last_used_s: float
    replay: Replay | None


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
            slot, steps, created_s, _, replay = entry
            entries[session_id] = _Entry(slot, steps, created_s, now, replay)  # re-inserted last: most recent
            found.append(Session(self._slab.view(slot), steps, created_s, entry.last_used_s, replay))
        return found

    async def create(self, session_id: str, session: Session) -> bool:
        """Add `session` unless `session_id` is taken; False (nothing written) when it is."""
        if session_id in self._entries:
            return False
        self._entries[session_id] = self._entry(session)
        return True

    async def replace(self, replacements: Sequence[Replacement]) -> list[bool]:
        """Swap in each successor whose stored session has consumed its `steps`; False (nothing written for
        it) for the others."""
        entries, written = self._entries, []
        for session_id, session, steps in replacements:
            old = entries.get(session_id)
            if old is None or old.steps != steps:
                written.append(False)
                continue
            # A new row, the old one released after: a reader of the old state never sees it change mid-chunk.
            entry = self._entry(session)
            self._forget(old)
            del entries[session_id]
            entries[session_id] = entry
            written.append(True)
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
                    self._entries[session_id] = entry._replace(replay=None)  # same key: keeps its LRU place
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

    def _entry(self, session: Session) -> _Entry:
        state = session.state
        if state.shape != self._shape or state.dtype != np.float32:
            raise ValueError(f"state must be float32 {self._shape}, got {state.dtype} {state.shape}")
        slot = self._slab.store(state)
        self._replay_bytes += _nbytes(session.replay)
        return _Entry(slot, session.steps, session.created_s, session.last_used_s, session.replay)

    def _remove(self, session_id: str, entry: _Entry) -> Session:
        del self._entries[session_id]
        slot, steps, created_s, last_used_s, replay = entry
        session = Session(self._slab.view(slot).copy(), steps, created_s, last_used_s, replay)
        self._forget(entry)
        return session

    def _forget(self, entry: _Entry) -> None:
        """Release what a replaced or removed entry held."""
        self._slab.release(entry.slot)
        self._replay_bytes -= _nbytes(entry.replay)


def _nbytes(replay: Replay | None) -> int:
    return 0 if replay is None else replay.nbytes
