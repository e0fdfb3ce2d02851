"""The session store: the only code that holds, replaces or frees a session's recurrent state (h, c).

A session's state is one read-only float32 array of shape (2, layers, hidden): [0] is h, [1] is c. It is
replaced, never mutated, so a reader's array never changes while the session lives (the in-memory store keeps
it in a `StateSlab` row, which is reused once the session has moved on or ended). The store enforces the
lifecycle (idle TTL, lifetime, capacity) and tells its listeners about every session that ends, and why.
"""

from __future__ import annotations

import enum
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from serving.errors import (
    CapacityExceededError,
    InvalidSnapshotError,
    SessionNotFoundError,
    SnapshotModelMismatchError,
)
from serving.slab import StateSlab


class EndReason(enum.Enum):
    """Why a session ended; the values are the `reason` label of `conveyor_sessions_ended_total`."""

    END = "end"
    TTL = "ttl"
    LIFETIME = "lifetime"
    CAPACITY = "capacity"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """A session that has ended: told to the store's listeners."""

    session_id: str
    reason: EndReason
    steps: int
    duration_s: float


class Replay(NamedTuple):
    """The last applied chunk's identity and result, so a retry is answered without applying it twice."""

    key: bytes  # digest of the chunk's flags and inputs
    offset: int
    outputs: np.ndarray  # the response's outputs, [time or 1, outputs]


class Session(NamedTuple):
    """One live session; immutable, the store swaps in a new one on each change (a named tuple, as `Replay`:
    built for every chunk, at a third of a frozen dataclass's cost). Lean: one per session."""

    slab: StateSlab  # where its state lives
    slot: int
    steps: int  # timesteps consumed
    created_s: float  # store clock
    last_used_s: float
    replay: Replay | None

    @property
    def state(self) -> np.ndarray:
        """(2, layers, hidden) float32, read-only: [0] is h, [1] is c."""
        return self.slab.view(self.slot)


class EndedReplay(NamedTuple):
    """What a session that ended with its last chunk keeps for a retry of that chunk."""

    replay: Replay
    steps: int  # the session's final step count
    ended_s: float  # store clock


@dataclass(frozen=True)
class StoreLimits:
    """The lifecycle limits a store enforces."""

    idle_ttl_s: float
    lifetime_s: float
    max_sessions: int
    evict_lru: bool  # at capacity: end the least recently used session instead of refusing a new one
    # How long a session keeps its last response for retries. Later, the sweep drops it, so an idle session
    # holds little more than its state; a retry after that gets ABORTED (applied once, response gone).
    replay_window_s: float = 60.0


Listener = Callable[[SessionEnd], None]


class SessionStore(Protocol):
    """Where sessions live. The in-memory store is the default; other backends implement the same calls."""

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with every session that ends, whatever the reason."""

    def find(self, session_id: str) -> Session | None:
        """The live session, marked as used now; None when unknown or expired (expiry ends it)."""

    def get(self, session_id: str) -> Session:
        """As `find`, but raises `SessionNotFoundError`."""

    def check_capacity(self, session_id: str) -> None:
        """Raise `CapacityExceededError` if a new session `session_id` would be refused right now."""

    def initial(self, snapshot: bytes) -> tuple[np.ndarray, int]:
        """A new session's state and step count: zeros and 0, or restored from a `snapshot` blob."""

    def put(self, session_id: str, state: np.ndarray, steps: int, replay: Replay, *, new: bool) -> bool:
        """Store a session's state after a chunk; `new` starts (or restarts) it. True when it was created.

        The store keeps a copy of `state`, which may be a view of a larger array (the batcher's rows are).
        """

    def end(self, session_id: str, reason: EndReason, *, keep_replay: bool = False) -> SessionEnd:
        """End a live session now; raises `SessionNotFoundError`. `keep_replay`: it ended with its own last
        chunk, whose response stays available to `ended_replay` for the replay window."""

    def ended_replay(self, session_id: str) -> EndedReplay | None:
        """The last chunk's replay of a session ended with `keep_replay`, within the replay window."""

    def end_all(self, reason: EndReason) -> None:
        """End every session."""

    def sweep(self) -> Iterator[None]:
        """End every session past its idle TTL or lifetime; drop replay caches past the replay window.

        A generator: the work is done as it is iterated, and it yields between slices of it, so the caller can
        let other work run in between (a pass over 100k sessions takes tens of milliseconds).
        """

    def snapshot(self, session_id: str) -> tuple[bytes, int]:
        """The session's state as an opaque blob for `initial`, and its step count."""

    def __len__(self) -> int:
        """Live sessions."""

    def state_bytes(self) -> int:
        """Bytes of recurrent state held for live sessions."""


# Snapshot blob: header, the state's float32 bytes (little-endian, C order), then a CRC32 of all before.
_MAGIC = b"CVYSNAP"
_VERSION = 1
_HEADER = struct.Struct("<7sB32sIIQ")  # magic, version, sha256 of model.onnx, layers, hidden, steps
_CRC = struct.Struct("<I")


# Sessions a sweep looks at before it lets the event loop run other work: 1-4 ms on the bench host, where a
# whole pass over 100k sessions takes 40-160 ms (160 when it drops their replay caches).
SWEEP_SLICE = 2000


class InMemorySessionStore:
    """Sessions in a dict kept in least-recently-used order (a use moves a session to the end)."""

    def __init__(
        self,
        *,
        layers: int,
        hidden: int,
        fingerprint: str,
        limits: StoreLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shape = (2, layers, hidden)
        self._fingerprint = bytes.fromhex(fingerprint)
        self._limits = limits
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._ended: dict[str, EndedReplay] = {}  # sessions ended by their last chunk, in order of ending
        self._slab = StateSlab(self._shape)
        self._listeners: list[Listener] = []
        self._zeros = np.zeros(self._shape, np.float32)  # shared by every fresh start
        self._zeros.flags.writeable = False

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with every session that ends, whatever the reason."""
        self._listeners.append(listener)

    def find(self, session_id: str) -> Session | None:
        """The live session, marked as used now; None when unknown or expired (expiry ends it)."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        reason = self._expiry(session, now)
        if reason is not None:
            self._end(session_id, reason)
            return None
        return self._store(session_id, session._replace(last_used_s=now))

    def get(self, session_id: str) -> Session:
        """As `find`, but raises `SessionNotFoundError`."""
        session = self.find(session_id)
        if session is None:
            raise SessionNotFoundError(session_id)
        return session

    def check_capacity(self, session_id: str) -> None:
        """Raise `CapacityExceededError` if a new session `session_id` would be refused right now."""
        full = len(self._sessions) >= self._limits.max_sessions
        if full and not self._limits.evict_lru and session_id not in self._sessions:
            raise CapacityExceededError(self._limits.max_sessions)

    def initial(self, snapshot: bytes) -> tuple[np.ndarray, int]:
        """A new session's state and step count: zeros and 0, or restored from a `snapshot` blob."""
        if not snapshot:
            return self._zeros, 0
        return self._restore(snapshot)

    def put(self, session_id: str, state: np.ndarray, steps: int, replay: Replay, *, new: bool) -> bool:
        """Store a session's state after a chunk; `new` starts (or restarts) it. True when it was created."""
        if state.shape != self._shape or state.dtype != np.float32:
            raise ValueError(f"state must be float32 {self._shape}, got {state.dtype} {state.shape}")
        now = self._clock()
        old = self._sessions.get(session_id)
        if new:
            if old is None:
                self._make_room(session_id)
                self._ended.pop(session_id, None)  # the id starts over: its old session's replay is void
            created_s = now
        elif old is None:
            raise SessionNotFoundError(session_id)  # ended while its chunk ran
        else:
            created_s = old.created_s
        # A new row, the old one released after: a reader of the old state never sees it change mid-chunk.
        slot = self._slab.store(state)
        if old is not None:
            self._slab.release(old.slot)
        self._store(session_id, Session(self._slab, slot, steps, created_s, now, replay))
        return old is None

    def end(self, session_id: str, reason: EndReason, *, keep_replay: bool = False) -> SessionEnd:
        """End a live session now; raises `SessionNotFoundError`. `keep_replay`: it ended with its own last
        chunk, whose response stays available to `ended_replay` for the replay window."""
        session = self.get(session_id)  # expiry first: an expired session ends as expired, not by this call
        ended = self._end(session_id, reason)
        if keep_replay and session.replay is not None:
            self._ended[session_id] = EndedReplay(session.replay, session.steps, self._clock())
            if len(self._ended) > self._limits.max_sessions:  # bounded like the live sessions
                del self._ended[next(iter(self._ended))]
        return ended

    def ended_replay(self, session_id: str) -> EndedReplay | None:
        """The last chunk's replay of a session ended with `keep_replay`, within the replay window."""
        ended = self._ended.get(session_id)
        if ended is None or self._clock() - ended.ended_s > self._limits.replay_window_s:
            return None
        return ended

    def end_all(self, reason: EndReason) -> None:
        """End every session."""
        for session_id in list(self._sessions):
            self._end(session_id, reason)

    def sweep(self) -> Iterator[None]:
        """End every session past its idle TTL or lifetime; drop replay caches past the replay window.

        Yields after each `SWEEP_SLICE` sessions. It visits the sessions live when it began, each looked up
        again when its slice comes: one used or ended in between is judged as it is then.
        """
        self._forget_ended(self._clock())
        session_ids = list(self._sessions)
        for first in range(0, len(session_ids), SWEEP_SLICE):
            now = self._clock()
            for session_id in session_ids[first : first + SWEEP_SLICE]:
                session = self._sessions.get(session_id)
                if session is not None:
                    self._sweep_one(session_id, session, now)
            yield

    def snapshot(self, session_id: str) -> tuple[bytes, int]:
        """The session's state as an opaque blob for `initial`, and its step count."""
        session = self.get(session_id)
        layers, hidden = self._shape[1:]
        body = _HEADER.pack(_MAGIC, _VERSION, self._fingerprint, layers, hidden, session.steps)
        body += session.state.astype("<f4", copy=False).tobytes()
        return body + _CRC.pack(zlib.crc32(body)), session.steps

    def __len__(self) -> int:
        """Live sessions."""
        return len(self._sessions)

    def state_bytes(self) -> int:
        """Bytes of recurrent state held for live sessions."""
        return len(self._sessions) * math.prod(self._shape) * 4

    def _store(self, session_id: str, session: Session) -> Session:
        # Re-insert at the end: dict order is then least recently used first.
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = session
        return session

    def _expiry(self, session: Session, now: float) -> EndReason | None:
        if now - session.created_s > self._limits.lifetime_s:
            return EndReason.LIFETIME
        if now - session.last_used_s > self._limits.idle_ttl_s:
            return EndReason.TTL
        return None

    def _forget_ended(self, now: float) -> None:
        # Kept in the order they ended: the expired ones are at the front.
        ended = self._ended
        while ended and now - next(iter(ended.values())).ended_s > self._limits.replay_window_s:
            del ended[next(iter(ended))]

    def _sweep_one(self, session_id: str, session: Session, now: float) -> None:
        reason = self._expiry(session, now)
        if reason is not None:
            self._end(session_id, reason)
        elif session.replay is not None and now - session.last_used_s > self._limits.replay_window_s:
            self._sessions[session_id] = session._replace(replay=None)  # same key: keeps its LRU place

    def _make_room(self, session_id: str) -> None:
        self.check_capacity(session_id)
        while len(self._sessions) >= self._limits.max_sessions:
            self._end(next(iter(self._sessions)), EndReason.CAPACITY)

    def _end(self, session_id: str, reason: EndReason) -> SessionEnd:
        session = self._sessions.pop(session_id)
        self._slab.release(session.slot)
        ended = SessionEnd(session_id, reason, session.steps, self._clock() - session.created_s)
        for listener in self._listeners:
            listener(ended)
        return ended

    def _restore(self, blob: bytes) -> tuple[np.ndarray, int]:
        if len(blob) < _HEADER.size or blob[: len(_MAGIC)] != _MAGIC:
            raise InvalidSnapshotError("the snapshot is not a Conveyor snapshot")
        _, version, fingerprint, layers, hidden, steps = _HEADER.unpack_from(blob)
        if version != _VERSION:
            raise InvalidSnapshotError(f"snapshot format version {version} is not supported (expected 1)")
        size = _HEADER.size + 2 * layers * hidden * 4 + _CRC.size
        if len(blob) != size or _CRC.unpack_from(blob, size - _CRC.size)[0] != zlib.crc32(blob[: -_CRC.size]):
            raise InvalidSnapshotError("the snapshot is truncated or corrupt (checksum mismatch)")
        if fingerprint != self._fingerprint:
            raise SnapshotModelMismatchError(fingerprint.hex(), self._fingerprint.hex())
        if (2, layers, hidden) != self._shape:
            raise InvalidSnapshotError(
                f"the snapshot holds state for {layers} layers x {hidden}, "
                f"not {self._shape[1]} x {self._shape[2]}"
            )
        state = np.frombuffer(blob, "<f4", 2 * layers * hidden, _HEADER.size).reshape(self._shape)
        if not np.isfinite(state).all():
            raise InvalidSnapshotError("the snapshot's state is not finite")
        return state.astype(np.float32), steps
