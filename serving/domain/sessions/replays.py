"""The replays of sessions that ended with their last chunk: a retry of that chunk is answered again.

A live session's replay is part of its stored record; once the session has ended, its last chunk's replay
moves here for the replay window, so that a client whose response to the ending chunk was lost can still
retry it exactly once. Bounded in count (the oldest is dropped first) and in time.
"""

from __future__ import annotations

from typing import NamedTuple

from serving.domain.sessions.store import Replay


class EndedReplay(NamedTuple):
    """What a session that ended with its last chunk keeps for a retry of that chunk."""

    replay: Replay
    steps: int  # the session's final step count
    ended_s: float  # lifecycle clock


class EndedReplays:
    """Ended sessions' last replays, in the order they ended, for `window_s`, at most `max_kept` of them."""

    def __init__(self, window_s: float, max_kept: int) -> None:
        self._window_s = window_s
        self._max_kept = max_kept
        self._kept: dict[str, EndedReplay] = {}
        self.held_bytes = 0  # of the kept outputs, kept as they come and go: read at every scrape

    def keep(self, session_id: str, replay: Replay, steps: int, now: float) -> None:
        """Keep the replay of `session_id`, which has just ended at `steps`."""
        self.discard(session_id)  # re-inserted last: the dict stays in order of ending
        self._kept[session_id] = EndedReplay(replay, steps, now)
        self.held_bytes += replay.nbytes
        if len(self._kept) > self._max_kept:
            self.discard(next(iter(self._kept)))

    def get(self, session_id: str, now: float) -> EndedReplay | None:
        """The kept replay of `session_id` while within the window; None otherwise."""
        ended = self._kept.get(session_id)
        if ended is None or now - ended.ended_s > self._window_s:
            return None
        return ended

    def discard(self, session_id: str) -> None:
        """Forget `session_id`'s replay: the id starts a new session, to which it does not belong."""
        dropped = self._kept.pop(session_id, None)
        if dropped is not None:
            self.held_bytes -= dropped.replay.nbytes

    def forget_expired(self, now: float) -> None:
        """Drop the replays past the window (they are at the front: kept in the order they ended)."""
        kept = self._kept
        while kept and now - next(iter(kept.values())).ended_s > self._window_s:
            self.discard(next(iter(kept)))
