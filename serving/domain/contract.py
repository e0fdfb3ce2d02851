"""The session contract's rules for one chunk: is it a repeat, may it start or continue its session, at what
offset; and what its run leaves in the store. The engine orders, locks and batches the chunks, and alone reads
and writes the sessions; this judges each chunk against its session as the engine found it, and says what
to write. It never touches the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, TypeGuard

import numpy as np

from serving.domain.backlog import Backlog
from serving.domain.chunks import Chunk, ChunkResult, OutputMode, ServedModel
from serving.domain.errors import (
    OffsetMismatchError,
    ReplayNotKeptError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
)
from serving.domain.notices import EndNotices, Watcher
from serving.domain.quotas import Quotas
from serving.domain.sessions.lifecycle import Commit, Listener
from serving.domain.sessions.replays import EndedReplay
from serving.domain.sessions.snapshots import SnapshotCodec
from serving.domain.sessions.store import Replay, Session, SessionEnd

Outcome = ChunkResult | Exception  # a chunk's result, or the error of its session alone


class SessionMetrics(Protocol):
    """What the contract reports; `serving.server.metrics.ConveyorMetrics` implements it."""

    def session_started(self) -> None:
        """A session was created."""

    def session_ended(self, reason: str, duration_s: float, steps: int) -> None:
        """A session ended."""

    def chunks_applied(self, timesteps: int, chunks: int = 1) -> None:
        """`chunks` chunks of `timesteps` each were run and committed (replays are not counted)."""


class Job(NamedTuple):  # a tuple: built for every chunk, and cheaper to build than a frozen dataclass
    """A checked chunk on its way through the engine."""

    session_id: str  # as the client knows it: in answers and error messages
    key: str  # where the session is kept: the id within the tenant's namespace
    chunk: Chunk
    digest: bytes  # identifies a repeat of the same chunk
    watcher: Watcher | None
    backlog: Backlog | None = None  # the queue its answer joins (the batcher may hold it for company)


class Run(NamedTuple):
    """A chunk judged to run: the state it runs from, and the session it will succeed (None: a new one)."""

    job: Job
    previous: Session | None
    state: np.ndarray
    steps: int

    def commit(self, answer: np.ndarray, state: np.ndarray, replay_max_bytes: int) -> Commit:
        """What the run leaves in the store: its new state and step count, and its answer for a replay (when
        no larger than `replay_max_bytes`; its digest always)."""
        chunk = self.job.chunk
        replay = Replay(self.job.digest, self.steps, answer if kept(answer, replay_max_bytes) else None)
        return Commit(self.job.key, self.previous, state, self.steps + len(chunk.inputs), replay, chunk.start)

    def result(self, steps: int, answer: np.ndarray) -> ChunkResult:
        """The chunk's answer once its run is stored, at `steps`."""
        chunk = self.job.chunk
        return ChunkResult(self.job.session_id, self.steps, steps, answer, chunk.end, False)


class Continued(NamedTuple):
    """Chunks, one per session, that continue their sessions (`continues`) and have run, as columns."""

    keys: list[str]
    found: list[Session]  # each session as found: the chunk ran from its state, at its step count
    time: int  # steps in each chunk
    answers: np.ndarray  # [rows, time or 1, outputs]: as answered
    digests: list[bytes]
    watcher: Watcher | None
    counts: np.ndarray | None = None  # a framed model: how many of each row's answers are its own


class Contract:
    """Judges chunks against their sessions as found, says what their runs leave in the store, and keeps the
    books of what was stored: quotas, session metrics, and the streams to tell when a session ends."""

    def __init__(
        self,
        model: ServedModel,
        metrics: SessionMetrics,
        quotas: Mapping[str, int] | None = None,
    ) -> None:
        self._model = model
        self._metrics = metrics
        self._snapshots = SnapshotCodec(model.spec.fingerprint, model.spec.session_size)
        self._notices = EndNotices()
        self._quotas = Quotas(quotas or {})

    def listeners(self) -> list[Listener]:
        """What must hear of every session's end (the engine registers them with its sessions)."""
        return [self._notices, self._quotas, self._count_end]

    def decide(self, job: Job, found: Session | None, ended: EndedReplay | None) -> ChunkResult | Run:
        """The chunk's cached result (a repeat), or what to run it from, given its session as just found
        (None: none live) and, when none is live, the replay its session left when it ended (None: none
        kept); raises a `ServingError` on a contract violation."""
        return self._start(job, found, ended) if job.chunk.start else self._continue(job, found, ended)

    def stored(self, job: Job, created: bool) -> None:
        """The job's run is in the store (`created`: as a new session)."""
        if created:
            self._quotas.started(job.chunk.namespace)
            self._metrics.session_started()
        self.watch(job)

    def replays(self, continued: Continued) -> list[Replay]:
        """The replays chunks that continued their sessions leave (as columns)."""
        # The rows share a size (framed: at most it), so one check does for all.
        keep = kept(continued.answers[0], self._model.replay_max_bytes)
        answers = list(continued.answers)
        if continued.counts is not None:
            answers = [answer[:count] for answer, count in zip(answers, continued.counts, strict=True)]
        rows = zip(continued.found, answers, continued.digests, strict=True)
        # The answer is a row of the frame's: a kept copy holds only its own bytes.
        return [
            Replay(digest, found.steps, answer.copy() if keep else None) for found, answer, digest in rows
        ]

    def continued_stored(self, continued: Continued, refused: Sequence[Exception | None]) -> None:
        """The continued chunks whose writes were not `refused` are in the store: their stream hears of
        their sessions' ends."""
        if continued.watcher is not None:
            stored = [key for key, error in zip(continued.keys, refused, strict=True) if error is None]
            self._notices.watch(stored, continued.watcher)

    def snapshot(self, session: Session) -> bytes:
        """The session's state and step count as an opaque blob bound to the model."""
        return self._snapshots.encode(session.state, session.steps)

    def watch(self, job: Job) -> None:
        """Tell the job's watcher (its stream) when its session ends."""
        if job.watcher is not None:
            self._notices.watch((job.key,), job.watcher)

    def unwatch(self, keys: list[str], watcher: Watcher) -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        self._notices.unwatch(keys, watcher)

    def _start(self, job: Job, existing: Session | None, ended: EndedReplay | None) -> ChunkResult | Run:
        if existing is not None:
            replayed = self._replayed(job, existing.replay, existing.steps, ended=False)
            if replayed is not None:
                self.watch(job)
                return replayed
            if not job.chunk.reset:
                raise SessionAlreadyExistsError(job.session_id, existing.steps)
        else:
            replayed = self._ended_replayed(job, ended)
            if replayed is not None:  # the chunk that started and ended its session, sent again
                return replayed
            self._quotas.check(job.chunk.namespace)
        state, steps = self._snapshots.initial(job.chunk.snapshot)
        return _runnable(job, existing, state, steps)

    def _continue(self, job: Job, session: Session | None, ended: EndedReplay | None) -> ChunkResult | Run:
        if continues(session, job.chunk.offset) or (job.chunk.append and session is not None):
            return Run(job, session, session.state, session.steps)
        if session is None:
            replayed = self._ended_replayed(job, ended)
            if replayed is None:
                raise SessionNotFoundError(job.session_id)
            return replayed
        replayed = self._replayed(job, session.replay, session.steps, ended=False)
        if replayed is not None:
            self.watch(job)
            return replayed
        return _runnable(job, session, session.state, session.steps)

    def _ended_replayed(self, job: Job, ended: EndedReplay | None) -> ChunkResult | None:
        """The answer again to the chunk that ended its session, when `job` repeats it within the replay
        window (a retry after its response was lost); else None."""
        return None if ended is None else self._replayed(job, ended.replay, ended.steps, ended=True)

    def _replayed(self, job: Job, replay: Replay | None, steps: int, *, ended: bool) -> ChunkResult | None:
        """The cached result when `job` repeats the chunk `replay` records, else None; `ReplayNotKeptError`
        when it does but the response was too large to keep."""
        if replay is None or replay.offset != job.chunk.offset or replay.key != job.digest:
            return None
        if replay.outputs is None:
            raise ReplayNotKeptError(job.session_id, replay.offset, steps, self._model.replay_max_bytes)
        return ChunkResult(job.session_id, replay.offset, steps, replay.outputs, ended, replayed=True)

    def _count_end(self, ended: SessionEnd) -> None:
        self._metrics.session_ended(ended.reason.value, ended.duration_s, ended.steps)


def answered(chunk: Chunk, y: np.ndarray) -> np.ndarray:
    """The outputs a chunk's answer carries of its run's `y` [time, outputs]: every timestep, or the last. A
    copy: the batcher's rows are views of the whole batch's (and a replay keeps only its own row alive)."""
    return (y[-1:] if chunk.outputs is OutputMode.LAST else y).copy()


def continues(session: Session | None, offset: int) -> TypeGuard[Session]:
    """Whether a chunk that continues its session (no start) at `offset` runs from `session` as found, with
    nothing else to judge: the session is live, and the chunk is at its step count. Such a chunk is never a
    repeat: a repeat's offset is its session's count before it, and a chunk holds at least one step."""
    return session is not None and session.steps == offset


def kept(answer: np.ndarray, replay_max_bytes: int) -> bool:
    """Whether a replay keeps `answer` itself; a larger one keeps only its digest (a retry of its chunk then
    gets `ReplayNotKeptError`)."""
    return answer.nbytes <= replay_max_bytes


def _runnable(job: Job, previous: Session | None, state: np.ndarray, steps: int) -> Run:
    if job.chunk.offset != steps and not job.chunk.append:
        raise OffsetMismatchError(job.session_id, job.chunk.offset, steps)
    return Run(job, previous, state, steps)
