"""The lifecycle policy over any `SessionStore`: idle TTL, lifetime, capacity, end notices, ended replays.

This is what the engine asks about sessions. It decides when a session has expired (on a look-up, and in a
sweep every interval), whether a new one fits (refuse or evict the least recently used), and tells its
listeners about every session that ends, and why. The store only keeps records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from serving.domain.errors import (
    CapacityExceededError,
    ServingError,
    SessionMovedError,
    SessionNotFoundError,
)
from serving.domain.sessions.replays import EndedReplay, EndedReplays
from serving.domain.sessions.store import (
    EVERYTHING,
    Cutoffs,
    EndReason,
    Replay,
    Session,
    SessionEnd,
    SessionStore,
    Successors,
)

logger = logging.getLogger(__name__)

Listener = Callable[[SessionEnd], None]


class Commit(NamedTuple):
    """A session's state after a chunk, to store as the successor of `previous` (None: a new session)."""

    session_id: str
    previous: Session | None
    state: np.ndarray
    steps: int
    replay: Replay
    restart: bool = False  # the chunk started it afresh (reset): its lifetime starts over


def _why_not(session_id: str, current: Session | None) -> ServingError:
    """Why a session's replacement was not written, given what the store holds now."""
    if current is None:
        return SessionNotFoundError(session_id)  # ended while its chunk ran
    return SessionMovedError(session_id, current.steps)  # another server applied one meanwhile


def _successor(commit: Commit, now: float) -> tuple[str, Session, int]:
    """What `commit` (of a session that existed) writes, used `now`: (session id, successor, steps the stored
    session must have consumed)."""
    previous = commit.previous
    assert previous is not None  # the caller's filter
    created_s = now if commit.restart else previous.created_s
    successor = Session(commit.state, commit.steps, created_s, now, commit.replay)
    return commit.session_id, successor, previous.steps


@dataclass(frozen=True)
class SessionLimits:
    """The lifecycle limits."""

    idle_ttl_s: float
    lifetime_s: float
    max_sessions: int
    evict_lru: bool  # at capacity: end the least recently used session instead of refusing a new one
    # How long a session keeps its last response for retries. Later, the sweep drops it, so an idle session
    # holds little more than its state; a retry after that gets ABORTED (applied once, response gone).
    replay_window_s: float = 60.0


class Sessions:
    """Sessions in `store` under `limits`, on the `clock` (monotonic seconds)."""

    def __init__(
        self,
        store: SessionStore,
        limits: SessionLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        occupancy: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        # The sessions `max_sessions` bounds: this store's, or (several model versions served, each with a
        # store of its own) the server's, so that capacity stays one server-wide limit.
        self._occupancy = occupancy or store.__len__
        self._limits = limits
        self._clock = clock
        self._ended = EndedReplays(limits.replay_window_s, limits.max_sessions)
        self._listeners: list[Listener] = []
        self._sweeper: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with every session that ends, whatever the reason."""
        self._listeners.append(listener)

    async def find(self, session_id: str) -> Session | None:
        """The live session, marked as used now; None when unknown or expired (expiry ends it)."""
        [session] = await self.find_many([session_id])
        return session

    async def find_many(self, session_ids: list[str]) -> list[Session | None]:
        """`find` of each session, at one reading of the clock."""
        now = self._clock()
        cutoffs = self._cutoffs(now)
        found = await self._store.get(session_ids, now)
        for index, session in enumerate(found):
            reason = None if session is None else cutoffs.reason(session.created_s, session.last_used_s)
            if reason is not None:
                await self._end(session_ids[index], reason)
                found[index] = None
        return found

    async def get(self, session_id: str) -> Session:
        """As `find`, but raises `SessionNotFoundError`."""
        session = await self.find(session_id)
        if session is None:
            raise SessionNotFoundError(session_id)
        return session

    def check_capacity(self) -> None:
        """Raise `CapacityExceededError` if a new session would be refused right now."""
        if self._occupancy() >= self._limits.max_sessions and not self._limits.evict_lru:
            raise CapacityExceededError(self._limits.max_sessions)

    async def commit_many(self, commits: Sequence[Commit]) -> list[bool | ServingError]:
        """Store each session's state after a chunk, the replacements in one store call. A commit's `previous`
        is the session as it was when the chunk began (None: a new one); it is replaced only if it is still
        what the store holds. For each, True when it created its session, or why it was not stored
        (`SessionMovedError`, `SessionNotFoundError`, `CapacityExceededError`)."""
        now = self._clock()
        stored: list[bool | ServingError] = [False] * len(commits)
        for index, commit in enumerate(commits):
            if commit.previous is None:
                new = Session(commit.state, commit.steps, now, now, commit.replay)
                try:
                    stored[index] = await self._create(commit.session_id, new, now)
                except ServingError as error:
                    stored[index] = error
        replacing = {
            index: _successor(commit, now)
            for index, commit in enumerate(commits)
            if commit.previous is not None
        }
        if replacing:
            refused = await self._replace(Successors.of(list(replacing.values())), now)
            for index, why_not in zip(replacing, refused, strict=True):
                stored[index] = why_not or False
        return stored

    async def advance(
        self,
        session_ids: list[str],
        found: list[Session],
        states: np.ndarray,
        steps: int,
        replays: Sequence[Replay | None],
    ) -> list[ServingError | None]:
        """Store each session's `states` row after a chunk of `steps` that continued it from `found` (replaced
        only if that is still what the store holds), in one store call: a frame's many commits as columns.
        For each, None when stored, else why not (`SessionMovedError`, `SessionNotFoundError`)."""
        now = self._clock()
        successors = Successors(
            session_ids,
            [session.steps for session in found],
            states,
            [session.steps + steps for session in found],
            [session.created_s for session in found],
            [now] * len(found),
            list(replays),
        )
        return await self._replace(successors, now)

    async def _replace(self, successors: Successors, now: float) -> list[ServingError | None]:
        """Write the successors, in one store call: for each, None when written, else why not."""
        written = await self._store.replace(successors)
        if all(written):
            return [None] * len(written)
        session_ids = successors.session_ids
        stale = [session_id for session_id, ok in zip(session_ids, written, strict=True) if not ok]
        current = dict(zip(stale, await self._store.get(stale, now), strict=True))
        return [
            None if ok else _why_not(session_id, current[session_id])
            for session_id, ok in zip(session_ids, written, strict=True)
        ]

    async def end(self, session_id: str, reason: EndReason, *, keep_replay: bool = False) -> SessionEnd:
        """End a live session now; raises `SessionNotFoundError`. `keep_replay`: it ended with its own last
        chunk, whose response stays available to `ended_replay` for the replay window."""
        session = await self.get(session_id)  # expiry first: an expired session ends as expired
        ended = await self._end(session_id, reason)
        if ended is None:
            raise SessionNotFoundError(session_id)
        if keep_replay and session.replay is not None:
            self._ended.keep(session_id, session.replay, session.steps, self._clock())
        return ended

    def ended_replay(self, session_id: str) -> EndedReplay | None:
        """The last chunk's replay of a session ended with `keep_replay`, within the replay window."""
        return self._ended.get(session_id, self._clock())

    async def shutdown(self) -> None:
        """Stop sweeping; end every session (reason shutdown), unless the store keeps them for the next
        server."""
        self.stop_sweeper()
        if not self._store.durable:
            await self.end_all(EndReason.SHUTDOWN)

    async def end_all(self, reason: EndReason) -> None:
        """End every session of the store, for `reason` (its model version is retired, or the server
        stops)."""
        async for removed in self._store.expire(EVERYTHING):
            for session_id, session, _ in removed:
                self._tell(session_id, session, reason)

    async def sweep(self) -> None:
        """End every session past its idle TTL or lifetime; drop replays past the replay window. Other work
        runs between the store's slices."""
        now = self._clock()
        self._ended.forget_expired(now)
        cutoffs = self._cutoffs(now)
        async for removed in self._store.expire(cutoffs):
            for session_id, session, reason in removed:
                self._tell(session_id, session, reason)
            await asyncio.sleep(0)

    def start_sweeper(self, interval_s: float) -> None:
        """Sweep every `interval_s`, so expired sessions end (and are told) without being touched."""
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_forever(interval_s), name="conveyor-sweeper"
        )

    def stop_sweeper(self) -> None:
        """Stop sweeping."""
        if self._sweeper is not None:
            self._sweeper.cancel()

    def __len__(self) -> int:
        """Live sessions."""
        return len(self._store)

    def held_bytes(self) -> dict[str, int]:
        """Bytes this process holds for sessions, by kind: states, live sessions' last responses, and ended
        sessions' (`ended_replay`)."""
        state, replay = self._store.held_bytes()
        return {"state": state, "replay": replay, "ended_replay": self._ended.held_bytes}

    def _cutoffs(self, now: float) -> Cutoffs:
        limits = self._limits
        return Cutoffs(now - limits.lifetime_s, now - limits.idle_ttl_s, now - limits.replay_window_s)

    async def _create(self, session_id: str, session: Session, now: float) -> bool:
        await self._make_room()
        if not await self._store.create(session_id, session):
            [current] = await self._store.get([session_id], now)  # started by another server meanwhile
            raise SessionMovedError(session_id, 0 if current is None else current.steps)
        self._ended.discard(session_id)  # the id starts over: its old session's replay is void
        return True

    async def _make_room(self) -> None:
        self.check_capacity()
        while self._occupancy() >= self._limits.max_sessions:
            oldest = await self._store.least_recent()
            if oldest is None:
                return
            await self._end(oldest, EndReason.CAPACITY)

    async def _end(self, session_id: str, reason: EndReason) -> SessionEnd | None:
        session = await self._store.end(session_id)
        if session is None:
            return None
        return self._tell(session_id, session, reason)

    def _tell(self, session_id: str, session: Session, reason: EndReason) -> SessionEnd:
        ended = SessionEnd(session_id, reason, session.steps, self._clock() - session.created_s)
        for listener in self._listeners:
            listener(ended)
        return ended

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:  # a failed sweep must not stop later ones
                logger.exception("session sweep failed")
