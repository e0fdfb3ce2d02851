"""The session contract's rules for one chunk: is it a repeat, may it start or continue its session, at what
offset; and how its result is committed. The engine orders, locks and batches the chunks; this decides each.
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
    ServingError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
    ShuttingDownError,
)
from serving.domain.notices import EndNotices, Watcher
from serving.domain.quotas import Quotas
from serving.domain.sessions.lifecycle import Commit, Sessions
from serving.domain.sessions.snapshots import SnapshotCodec
from serving.domain.sessions.store import EndReason, Replay, Session, SessionEnd

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


class Continued(NamedTuple):
    """Chunks, one per session, that continue their sessions (`continues`) and have run, as columns."""

    keys: list[str]
    found: list[Session]  # each session as found: the chunk ran from its state, at its step count
    time: int  # steps in each chunk
    answers: np.ndarray  # [rows, time or 1, outputs]: as answered
    digests: list[bytes]
    watcher: Watcher | None


class Contract:
    """Judges chunks against their sessions as found, and commits the runs, telling the watchers."""

    def __init__(
        self,
        model: ServedModel,
        sessions: Sessions,
        metrics: SessionMetrics,
        quotas: Mapping[str, int] | None = None,
    ) -> None:
        self._model = model
        self._sessions = sessions
        self._metrics = metrics
        self.snapshots = SnapshotCodec(model.spec.fingerprint, model.spec.state_size)
        self._notices = EndNotices()
        self._quotas = Quotas(quotas or {})
        self.closed = False  # set once every session has ended at shutdown: nothing more is committed
        sessions.add_listener(self._notices)
        sessions.add_listener(self._quotas)
        sessions.add_listener(self._count_end)

    def decide(self, job: Job, found: Session | None) -> ChunkResult | Run:
        """The chunk's cached result (a repeat), or what to run it from, given its session as just found
        (None: none live); raises a `ServingError` on a contract violation."""
        return self._start(job, found) if job.chunk.start else self._continue(job, found)

    async def commit(
        self,
        runs: Sequence[Run],
        outputs: Sequence[np.ndarray],
        new_states: Sequence[np.ndarray] | np.ndarray,
    ) -> list[Outcome]:
        """Commit each run's `outputs` (as answered: the caller's own copies, kept for a replay) and new state
        as the successor of its `previous` (None: new), in one store call; each run's result, or the error
        of its session alone."""
        if self.closed:  # the grace period ran out: every session has ended
            return [ShuttingDownError() for _ in runs]
        commits = [
            _commit(run, answer, state, self._model.replay_max_bytes)
            for run, answer, state in zip(runs, outputs, new_states, strict=True)
        ]
        stored = await self._sessions.commit_many(commits)
        outcomes: list[Outcome] = []
        for run, answer, commit, created in zip(runs, outputs, commits, stored, strict=True):
            job, chunk = run.job, run.job.chunk
            if isinstance(created, Exception):
                outcomes.append(created)
                continue
            if created:
                self._quotas.started(chunk.namespace)
                self._metrics.session_started()
            self.watch(job)
            ended = await self._end(job) if chunk.end else None
            outcomes.append(
                ended or ChunkResult(job.session_id, chunk.offset, commit.steps, answer, chunk.end, False)
            )
        return outcomes

    async def commit_continued(
        self, continued: Continued, new_states: np.ndarray
    ) -> list[ServingError | None]:
        """Commit chunks that continued their sessions (`continues`: nothing to judge, nothing to tell but
        the watcher), as columns, in one store call: for each, None when stored, else the error of its
        session alone."""
        if self.closed:
            return [ShuttingDownError() for _ in continued.keys]
        keep = _kept(continued.answers[0], self._model.replay_max_bytes)  # the rows share a size
        rows = zip(continued.found, continued.answers, continued.digests, strict=True)
        # The answer is a row of the frame's: a kept copy holds only its own bytes.
        replays = [
            Replay(digest, found.steps, answer.copy() if keep else None) for found, answer, digest in rows
        ]
        refused = await self._sessions.advance(
            continued.keys, continued.found, new_states, continued.time, replays
        )
        if continued.watcher is not None:
            stored = [key for key, error in zip(continued.keys, refused, strict=True) if error is None]
            self._notices.watch(stored, continued.watcher)
        return refused

    async def _end(self, job: Job) -> ServingError | None:
        """End the session whose last chunk `job` was (its answer kept for a retry); None, or why not."""
        try:
            await self._sessions.end(job.key, EndReason.END, keep_replay=True)
        except ServingError as error:
            return error
        return None

    def watch(self, job: Job) -> None:
        """Tell the job's watcher (its stream) when its session ends."""
        if job.watcher is not None:
            self._notices.watch((job.key,), job.watcher)

    def unwatch(self, keys: list[str], watcher: Watcher) -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        self._notices.unwatch(keys, watcher)

    def _start(self, job: Job, existing: Session | None) -> ChunkResult | Run:
        if existing is not None:
            replayed = self._replayed(job, existing.replay, existing.steps, ended=False)
            if replayed is not None:
                self.watch(job)
                return replayed
            if not job.chunk.reset:
                raise SessionAlreadyExistsError(job.session_id, existing.steps)
        else:
            replayed = self._ended_replayed(job)
            if replayed is not None:  # the chunk that started and ended its session, sent again
                return replayed
            self._sessions.check_capacity()
            self._quotas.check(job.chunk.namespace)
        state, steps = self.snapshots.initial(job.chunk.snapshot)
        return _runnable(job, existing, state, steps)

    def _continue(self, job: Job, session: Session | None) -> ChunkResult | Run:
        if continues(session, job.chunk.offset):
            return Run(job, session, session.state, session.steps)
        if session is None:
            replayed = self._ended_replayed(job)
            if replayed is None:
                raise SessionNotFoundError(job.session_id)
            return replayed
        replayed = self._replayed(job, session.replay, session.steps, ended=False)
        if replayed is not None:
            self.watch(job)
            return replayed
        return _runnable(job, session, session.state, session.steps)

    def _ended_replayed(self, job: Job) -> ChunkResult | None:
        """The answer again to the chunk that ended its session, when `job` repeats it within the replay
        window (a retry after its response was lost); else None."""
        ended = self._sessions.ended_replay(job.key)
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


def _commit(run: Run, answer: np.ndarray, state: np.ndarray, replay_max_bytes: int) -> Commit:
    """What `run` leaves in the store: its new state and step count, and its answer for a replay (when no
    larger than `replay_max_bytes`; its digest always)."""
    job, chunk = run.job, run.job.chunk
    replay = Replay(job.digest, chunk.offset, answer if _kept(answer, replay_max_bytes) else None)
    return Commit(job.key, run.previous, state, run.steps + len(chunk.inputs), replay, chunk.start)


def _kept(answer: np.ndarray, replay_max_bytes: int) -> bool:
    """Whether a replay keeps `answer` itself; a larger one keeps only its digest (a retry of its chunk then
    gets `ReplayNotKeptError`)."""
    return answer.nbytes <= replay_max_bytes


def _runnable(job: Job, previous: Session | None, state: np.ndarray, steps: int) -> Run:
    if job.chunk.offset != steps:
        raise OffsetMismatchError(job.session_id, job.chunk.offset, steps)
    return Run(job, previous, state, steps)
