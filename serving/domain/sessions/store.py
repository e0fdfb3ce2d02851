"""The session store interface: all a backend must do, and the immutable records it holds.

A backend keeps `session_id -> Session` and nothing else: look up, create, replace with a compare-and-set on
the step count, end, expire, count (and name its least recently used session, for eviction at capacity, and
say what memory it holds here). Look-ups and replacements take many sessions per call: a frame's sessions
go through the store together (one loop in memory, one round trip to a networked store).
What the contract builds over it (capacity, end notices, ended sessions' replays, snapshots) lives in
`serving.domain.sessions.lifecycle` and `.snapshots`, the same for every backend. The compare-and-set is what
makes a shared backend safe: two servers can never both apply a chunk at the same offset.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


class EndReason(enum.Enum):
    """Why a session ended; the values are the `reason` label of `conveyor_sessions_ended_total`."""

    END = "end"
    TTL = "ttl"
    LIFETIME = "lifetime"
    CAPACITY = "capacity"
    SHUTDOWN = "shutdown"
    MODEL_RETIRED = "model_retired"  # its model version drained past the deadline


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """A session that has ended: told to the lifecycle's listeners."""

    session_id: str
    reason: EndReason
    steps: int
    duration_s: float


class Replay(NamedTuple):
    """The last applied chunk's identity and result, so a retry is answered without applying it twice."""

    key: bytes  # digest of the chunk's flags and inputs
    offset: int
    # The response's outputs, [time or 1, outputs]; None when larger than the replay budget: the digest alone
    # still keeps a retry from being applied twice.
    outputs: np.ndarray | None

    @property
    def nbytes(self) -> int:
        """Bytes of the kept outputs (0 when only the digest is kept)."""
        return 0 if self.outputs is None else self.outputs.nbytes


class Session(NamedTuple):
    """One live session as a store hands it out: immutable, replaced whole on each change (a named tuple, as
    `Replay`: one is built for every chunk, at a third of a frozen dataclass's cost)."""

    state: np.ndarray  # (2, layers, hidden) float32, read-only: [0] is h, [1] is c
    steps: int  # timesteps consumed
    created_s: float  # lifecycle clock
    last_used_s: float
    replay: Replay | None


class Cutoffs(NamedTuple):
    """Clock readings before which a session is past a limit: what `expire` ends and drops."""

    created_s: float  # created before: past its lifetime
    used_s: float  # last used before: idle past its TTL
    replay_s: float  # last used before: its replay is dropped (the session lives on)

    def reason(self, created_s: float, last_used_s: float) -> EndReason | None:
        """Why a session created and last used at these times has expired; None while it has not."""
        if created_s < self.created_s:
            return EndReason.LIFETIME
        if last_used_s < self.used_s:
            return EndReason.TTL
        return None


class HeldBytes(NamedTuple):
    """Bytes a store holds in this process, by kind (a networked store holds its sessions elsewhere: 0)."""

    state: int  # recurrent states, as allocated
    replay: int  # live sessions' last responses, kept for retries


Expired = tuple[str, Session, EndReason]  # a session `expire` removed, and why


class Successors(NamedTuple):
    """Sessions' successors as columns (a frame's sessions, or one), each to be written only if its stored
    session has consumed `expected[i]` steps (compare-and-set). The ids are distinct."""

    session_ids: list[str]
    expected: list[int]
    states: np.ndarray  # [sessions, state size] float32: a store keeps its own copy
    steps: list[int]
    created_s: list[float]
    last_used_s: list[float]
    replays: list[Replay | None]

    @classmethod
    def of(cls, replacements: Sequence[tuple[str, Session, int]]) -> Successors:
        """Each (session id, successor, steps the stored session must have consumed) as columns."""
        sessions = [session for _, session, _ in replacements]
        return cls(
            [session_id for session_id, _, _ in replacements],
            [expected for _, _, expected in replacements],
            np.array([session.state for session in sessions], np.float32),
            [session.steps for session in sessions],
            [session.created_s for session in sessions],
            [session.last_used_s for session in sessions],
            [session.replay for session in sessions],
        )

    def session(self, row: int) -> Session:
        """Row `row`'s successor."""
        return Session(
            self.states[row], self.steps[row], self.created_s[row], self.last_used_s[row], self.replays[row]
        )


EVERYTHING = Cutoffs(float("inf"), float("inf"), float("inf"))  # every session is past these


class SessionStore(Protocol):
    """Where sessions live. The in-memory store is the default; other backends implement these calls.

    A stored state may be a view of a larger array (the batcher's rows are): a store keeps its own copy. A
    backend that cannot be reached raises `StoreUnavailableError` from any call.
    """

    # True when sessions outlive this process (a shared store): a shutdown then leaves them for the next
    # server instead of ending them.
    durable: bool

    async def get(self, session_ids: Sequence[str], now: float) -> list[Session | None]:
        """Each session as it was before this look-up (None: none), which is a use: its last use becomes
        `now`."""
        ...

    async def create(self, session_id: str, session: Session) -> bool:
        """Add `session` unless `session_id` is taken; False (nothing written) when it is."""
        ...

    async def replace(self, successors: Successors) -> list[bool]:
        """Swap in each successor whose stored session has consumed its expected steps (compare-and-set);
        False for one whose has not or is gone: the caller's copy was stale, nothing was written for it."""
        ...

    async def end(self, session_id: str) -> Session | None:
        """Remove a session and return it (its state a copy); None when there was none."""
        ...

    def expire(self, cutoffs: Cutoffs) -> AsyncIterator[list[Expired]]:
        """Remove every session past `cutoffs` and drop the replays of those last used before
        `cutoffs.replay_s`, yielding the removed in slices so that the caller can let other work run in
        between (a pass over 100k sessions takes tens of milliseconds). Each session is judged as it is when
        its slice comes."""
        ...

    async def least_recent(self) -> str | None:
        """The id of the session used longest ago; None when there is none."""
        ...

    def __len__(self) -> int:
        """Live sessions (read at scrape time)."""
        ...

    def held_bytes(self) -> HeldBytes:
        """What this process holds for the sessions (read at scrape time)."""
        ...
