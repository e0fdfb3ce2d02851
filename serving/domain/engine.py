"""The session contract, with no gRPC in it: ids, start/end/reset/restore, offsets, exactly-once retries,
per-session ordering and shutdown. The servicer translates; this decides.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from serving.domain.backlog import Backlog
from serving.domain.batcher import Batcher
from serving.domain.chunks import (
    Chunk,
    ChunkResult,
    OutputMode,
    ServedModel,
    check_session_id,
    chunk_digest,
    session_key,
    validate,
)
from serving.domain.errors import (
    OffsetMismatchError,
    ReplayNotKeptError,
    ServingError,
    SessionAlreadyExistsError,
    SessionMovedError,
    SessionNotFoundError,
    ShuttingDownError,
)
from serving.domain.frames import Outcome, misfits, outcome
from serving.domain.locks import Admission
from serving.domain.notices import EndNotices, Watcher
from serving.domain.quotas import Quotas
from serving.domain.sessions.lifecycle import Sessions
from serving.domain.sessions.snapshots import SnapshotCodec
from serving.domain.sessions.store import EndReason, Replay, Session, SessionEnd

_T = TypeVar("_T")


class SessionMetrics(Protocol):
    """What the engine reports; `serving.server.metrics.ConveyorMetrics` implements it."""

    def session_started(self) -> None:
        """A session was created."""

    def session_ended(self, reason: str, duration_s: float, steps: int) -> None:
        """A session ended."""

    def chunk_applied(self, timesteps: int) -> None:
        """A chunk was run and its state committed (replays are not counted)."""


class _Job(NamedTuple):  # a tuple: built for every chunk, and cheaper to build than a frozen dataclass
    session_id: str  # as the client knows it: in answers and error messages
    key: str  # where the session is kept: the id within the tenant's namespace
    chunk: Chunk
    digest: bytes  # identifies a repeat of the same chunk
    watcher: Watcher | None
    backlog: Backlog | None = None  # the queue its answer joins (the batcher may hold it for company)


class _Run(NamedTuple):
    """A chunk judged to run: the state it runs from, and the session it will succeed (None: a new one)."""

    job: _Job
    previous: Session | None
    state: np.ndarray
    steps: int


class Engine:
    """Applies chunks to sessions under the session contract, one chunk per session at a time."""

    def __init__(
        self,
        model: ServedModel,
        sessions: Sessions,
        batcher: Batcher,
        metrics: SessionMetrics,
        quotas: Mapping[str, int] | None = None,
    ) -> None:
        self.model = model
        self._sessions = sessions
        self._batcher = batcher
        self._metrics = metrics
        self._snapshots = SnapshotCodec(model.spec.fingerprint, model.spec.state_size)
        self._admission = Admission()
        self._notices = EndNotices()
        self._closed = False
        self._quotas = Quotas(quotas or {})
        sessions.add_listener(self._notices)
        sessions.add_listener(self._quotas)
        sessions.add_listener(self._count_end)

    async def step(
        self, chunk: Chunk, watcher: Watcher | None = None, backlog: Backlog | None = None
    ) -> ChunkResult:
        """Apply `chunk` (or answer its repeat); `watcher` is then told when the session ends; `backlog` is
        the queue its answer joins (`serving.domain.backlog`).

        Raises a `ServingError` subclass on any contract violation, leaving the session's state unchanged.
        """
        self._admission.check_open()
        job = self._job(chunk, watcher, backlog)
        async with self._admission.hold(job.key):
            return await self._applied(job)

    async def step_frame(self, chunks: list[Chunk], watcher: Watcher | None = None) -> list[Outcome]:
        """Apply one chunk for each of many sessions (a frame: chunks of one length), the runnable ones as one
        batch, under `step`'s contract session by session; each session's outcome, in order. A session's
        error is its own: the others go on."""
        self._admission.check_open()
        outcomes: list[Outcome | None] = [None] * len(chunks)
        jobs: dict[int, _Job] = {}
        for index, chunk in enumerate(chunks):
            try:
                jobs[index] = self._job(chunk, watcher)
            except ServingError as error:
                outcomes[index] = error
        keys = {index: job.key for index, job in jobs.items()}
        for index, refused in misfits(keys, {i: len(job.chunk.inputs) for i, job in jobs.items()}).items():
            del jobs[index]
            outcomes[index] = refused
        async with self._admission.hold_all([job.key for job in jobs.values()]):
            runs: dict[int, _Run] = {}
            for index, job in jobs.items():
                judged = await outcome(job.session_id, self._judge(job))
                if isinstance(judged, _Run):
                    runs[index] = judged
                else:
                    outcomes[index] = judged
            if runs:
                await self._run_frame(runs, outcomes)
        return [outcome for outcome in outcomes if outcome is not None]

    async def end_session(self, session_id: str, namespace: str = "") -> int:
        """End a live session of tenant `namespace`; returns its step count."""
        key = session_key(namespace, session_id)
        ended = await self._locked(session_id, key, lambda: self._sessions.end(key, EndReason.END))
        return ended.steps

    async def snapshot(self, session_id: str, namespace: str = "") -> tuple[bytes, int]:
        """The session's state as an opaque blob, and its step count."""
        key = session_key(namespace, session_id)
        session = await self._locked(session_id, key, lambda: self._sessions.get(key))
        return self._snapshots.encode(session.state, session.steps), session.steps

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher, namespace: str = "") -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        self._notices.unwatch((session_key(namespace, s) for s in session_ids), watcher)

    async def close(self, grace_s: float) -> None:
        """Refuse new work and give in-flight chunks `grace_s` to finish. Then every session ends (shutdown),
        unless the store keeps them for the next server."""
        self._sessions.stop_sweeper()
        await self._admission.close(grace_s)
        self._closed = True
        await self._sessions.shutdown()

    def _job(self, chunk: Chunk, watcher: Watcher | None, backlog: Backlog | None = None) -> _Job:
        validate(chunk, self.model)
        session_id = chunk.session_id or uuid.uuid4().hex
        key = session_key(chunk.namespace, session_id)
        return _Job(session_id, key, chunk, chunk_digest(chunk), watcher, backlog)

    async def _apply_or_replay(self, job: _Job) -> ChunkResult:
        judged = await self._judge(job)
        if isinstance(judged, ChunkResult):
            return judged
        y, new_state = await self._batcher.run(job.chunk.inputs, judged.state, job.backlog)
        return await self._commit(judged, y, new_state)

    async def _applied(self, job: _Job) -> ChunkResult:
        """`_apply_or_replay`, errors naming the session as the client does (the store knows its key)."""
        try:
            try:
                return await self._apply_or_replay(job)
            except SessionMovedError:
                # Another server (sharing the store) applied a chunk meanwhile; this run was discarded. Judged
                # again against the session as it now stands: the same chunk is then a replay, any other an
                # offset mismatch.
                return await self._apply_or_replay(job)
        except SessionNotFoundError:
            raise SessionNotFoundError(job.session_id) from None
        except SessionMovedError as moved:
            raise SessionMovedError(job.session_id, moved.steps) from None

    async def _run_frame(self, runs: dict[int, _Run], outcomes: list[Outcome | None]) -> None:
        """Run a frame's runnable chunks as one block, and commit each (or fail them all with the run)."""
        x = np.stack([run.job.chunk.inputs for run in runs.values()])
        states = np.stack([run.state for run in runs.values()])
        try:
            ys, new_states = await self._batcher.run_block(x, states)
        except Exception as error:  # the runtime failed: every session of the block stays as it was
            for index in runs:
                outcomes[index] = error
            return
        for row, (index, run) in enumerate(runs.items()):
            committed = await outcome(run.job.session_id, self._commit(run, ys[row], new_states[row]))
            if isinstance(committed, SessionMovedError):  # as in `_applied`: judged again, alone
                committed = await outcome(run.job.session_id, self._applied(run.job))
            outcomes[index] = committed

    async def _judge(self, job: _Job) -> ChunkResult | _Run:
        """The chunk's cached result (a repeat), or what to run it from; raises on a contract violation."""
        return await (self._start(job) if job.chunk.start else self._continue(job))

    async def _start(self, job: _Job) -> ChunkResult | _Run:
        existing = await self._sessions.find(job.key)
        if existing is not None:
            replayed = self._replayed(job, existing.replay, existing.steps, ended=False)
            if replayed is not None:
                self._watch(job)
                return replayed
            if not job.chunk.reset:
                raise SessionAlreadyExistsError(job.session_id, existing.steps)
        else:
            replayed = self._ended_replayed(job)
            if replayed is not None:  # the chunk that started and ended its session, sent again
                return replayed
            self._sessions.check_capacity()
            self._quotas.check(job.chunk.namespace)
        state, steps = self._snapshots.initial(job.chunk.snapshot)
        return self._runnable(job, existing, state, steps)

    async def _continue(self, job: _Job) -> ChunkResult | _Run:
        session = await self._sessions.find(job.key)
        if session is None:
            replayed = self._ended_replayed(job)
            if replayed is None:
                raise SessionNotFoundError(job.session_id)
            return replayed
        replayed = self._replayed(job, session.replay, session.steps, ended=False)
        if replayed is not None:
            self._watch(job)
            return replayed
        return self._runnable(job, session, session.state, session.steps)

    def _ended_replayed(self, job: _Job) -> ChunkResult | None:
        """The answer again to the chunk that ended its session, when `job` repeats it within the replay
        window (a retry after its response was lost); else None."""
        ended = self._sessions.ended_replay(job.key)
        return None if ended is None else self._replayed(job, ended.replay, ended.steps, ended=True)

    @staticmethod
    def _runnable(job: _Job, previous: Session | None, state: np.ndarray, steps: int) -> _Run:
        if job.chunk.offset != steps:
            raise OffsetMismatchError(job.session_id, job.chunk.offset, steps)
        return _Run(job, previous, state, steps)

    async def _commit(self, run: _Run, y: np.ndarray, new_state: np.ndarray) -> ChunkResult:
        """Commit the run's outputs `y` and `new_state` as the successor of `run.previous` (None: new)."""
        job, previous, steps = run.job, run.previous, run.steps
        chunk = job.chunk
        if self._closed:
            raise ShuttingDownError()  # the grace period ran out: every session has ended
        # A copy: the batcher's rows are views of the whole batch's outputs.
        outputs = (y[-1:] if chunk.outputs is OutputMode.LAST else y).copy()
        steps += len(chunk.inputs)
        kept = outputs if outputs.nbytes <= self.model.replay_max_bytes else None
        replay = Replay(job.digest, chunk.offset, kept)
        if await self._sessions.commit(job.key, previous, new_state, steps, replay, restart=chunk.start):
            self._quotas.started(chunk.namespace)
            self._metrics.session_started()
        self._metrics.chunk_applied(len(chunk.inputs))
        self._watch(job)
        if chunk.end:
            await self._sessions.end(job.key, EndReason.END, keep_replay=True)
        return ChunkResult(job.session_id, chunk.offset, steps, outputs, chunk.end, replayed=False)

    async def _locked(self, session_id: str, key: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        self._admission.check_open()
        check_session_id(session_id)
        async with self._admission.hold(key):
            try:
                return await operation()
            except SessionNotFoundError:  # the store knows the key; the client, its session id
                raise SessionNotFoundError(session_id) from None

    def _watch(self, job: _Job) -> None:
        if job.watcher is not None:
            self._notices.watch(job.key, job.watcher)

    def _count_end(self, ended: SessionEnd) -> None:
        self._metrics.session_ended(ended.reason.value, ended.duration_s, ended.steps)

    def _replayed(self, job: _Job, replay: Replay | None, steps: int, *, ended: bool) -> ChunkResult | None:
        """The cached result when `job` repeats the chunk `replay` records, else None; `ReplayNotKeptError`
        when it does but the response was too large to keep."""
        if replay is None or replay.offset != job.chunk.offset or replay.key != job.digest:
            return None
        if replay.outputs is None:
            raise ReplayNotKeptError(job.session_id, replay.offset, steps, self.model.replay_max_bytes)
        return ChunkResult(job.session_id, replay.offset, steps, replay.outputs, ended, replayed=True)
