"""The session contract, with no gRPC in it: ids, start/end/reset/restore, offsets, exactly-once retries,
per-session ordering and shutdown. The servicer translates; this orders, locks and batches the chunks, and
`serving.domain.contract` decides each.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import numpy as np

from serving.domain.backlog import Backlog
from serving.domain.batcher import Batcher
from serving.domain.chunks import (
    Chunk,
    ChunkResult,
    ServedModel,
    check_session_id,
    chunk_digest,
    session_key,
    validate,
)
from serving.domain.contract import Contract, Job, Outcome, Run, SessionMetrics, answered
from serving.domain.errors import ServingError, SessionMovedError, SessionNotFoundError
from serving.domain.frames import misfits, value_errors
from serving.domain.locks import Admission
from serving.domain.notices import Watcher
from serving.domain.sessions.lifecycle import Sessions
from serving.domain.sessions.store import EndReason

_T = TypeVar("_T")


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
        self._contract = Contract(model, sessions, metrics, quotas)
        self._admission = Admission()

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
        error is its own: the others go on.

        The inputs' values are checked as one block, the sessions looked up and committed in one store call
        each, and the block run as one batch."""
        self._admission.check_open()
        outcomes: list[Outcome | None] = [None] * len(chunks)
        jobs, block = self._frame_jobs(chunks, watcher, outcomes)
        async with self._admission.hold_all([job.key for job in jobs.values()]):
            runs = await self._judge_frame(jobs, outcomes)
            if runs:
                rows = [row for row, index in enumerate(jobs) if index in runs]
                await self._run_frame(runs, block if len(rows) == len(block) else block[rows], outcomes)
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
        return self._contract.snapshots.encode(session.state, session.steps), session.steps

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher, namespace: str = "") -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        self._contract.unwatch([session_key(namespace, s) for s in session_ids], watcher)

    async def close(self, grace_s: float) -> None:
        """Refuse new work and give in-flight chunks `grace_s` to finish. Then every session ends (shutdown),
        unless the store keeps them for the next server."""
        self._sessions.stop_sweeper()
        await self._admission.close(grace_s)
        self._contract.closed = True
        await self._sessions.shutdown()

    def _job(
        self, chunk: Chunk, watcher: Watcher | None, backlog: Backlog | None = None, *, values: bool = True
    ) -> Job:
        """The checked chunk (its inputs' values too, unless a frame checks them as a block)."""
        validate(chunk, self.model, values=values)
        session_id = chunk.session_id or uuid.uuid4().hex
        key = session_key(chunk.namespace, session_id)
        return Job(session_id, key, chunk, chunk_digest(chunk), watcher, backlog)

    async def _apply_or_replay(self, job: Job) -> ChunkResult:
        judged = self._contract.decide(job, await self._sessions.find(job.key))
        if isinstance(judged, ChunkResult):
            return judged
        y, new_state = await self._batcher.run(job.chunk.inputs, judged.state, job.backlog)
        [result] = await self._contract.commit([judged], [answered(job.chunk, y)], [new_state])
        if isinstance(result, Exception):
            raise result
        self._metrics.chunks_applied(len(job.chunk.inputs))
        return result

    async def _applied(self, job: Job) -> ChunkResult:
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

    def _frame_jobs(
        self, chunks: list[Chunk], watcher: Watcher | None, outcomes: list[Outcome | None]
    ) -> tuple[dict[int, Job], np.ndarray]:
        """The frame's chunks that pass its checks, by position, and their inputs as one block (in that
        order); the others' errors go to `outcomes`."""
        jobs: dict[int, Job] = {}
        for index, chunk in enumerate(chunks):
            try:
                jobs[index] = self._job(chunk, watcher, values=False)
            except ServingError as error:
                outcomes[index] = error
        lengths = {index: len(job.chunk.inputs) for index, job in jobs.items()}
        _refuse(jobs, misfits({index: job.key for index, job in jobs.items()}, lengths), outcomes)
        if not jobs:
            return jobs, np.empty(0)
        # np.array rather than np.stack: for many small rows of one shape, 2-3x faster
        block = np.array([job.chunk.inputs for job in jobs.values()])
        bad = value_errors(block, list(jobs), self.model)
        if bad:
            block = block[[row for row, index in enumerate(jobs) if index not in bad]]
            _refuse(jobs, bad, outcomes)
        return jobs, block

    async def _judge_frame(self, jobs: dict[int, Job], outcomes: list[Outcome | None]) -> dict[int, Run]:
        """The frame's chunks to run, by position; the others' answers (replays) or errors to `outcomes`."""
        found = await self._sessions.find_many([job.key for job in jobs.values()])
        runs: dict[int, Run] = {}
        for (index, job), session in zip(jobs.items(), found, strict=True):
            try:
                judged = self._contract.decide(job, session)
            except ServingError as error:
                outcomes[index] = error
                continue
            if isinstance(judged, Run):
                runs[index] = judged
            else:
                outcomes[index] = judged
        return runs

    async def _run_frame(self, runs: dict[int, Run], x: np.ndarray, outcomes: list[Outcome | None]) -> None:
        """Run a frame's runnable chunks `x` as one block and commit them (or fail them all with the run)."""
        states = np.array([run.state for run in runs.values()])  # rows of one shape: see `_frame_jobs`
        try:
            ys, new_states = await self._batcher.run_block(x, states)
        except Exception as error:  # the runtime failed: every session of the block stays as it was
            for index in runs:
                outcomes[index] = error
            return
        answers = [answered(run.job.chunk, y) for run, y in zip(runs.values(), ys, strict=True)]
        committed = await self._contract.commit(list(runs.values()), answers, new_states)
        for (index, run), outcome in zip(runs.items(), committed, strict=True):
            outcomes[index] = (
                outcome if isinstance(outcome, ChunkResult) else await self._recommitted(run.job, outcome)
            )
        self._metrics.chunks_applied(
            x.shape[1], sum(isinstance(outcome, ChunkResult) for outcome in committed)
        )

    async def _recommitted(self, job: Job, error: Exception) -> Outcome:
        """A frame's session whose commit failed with `error`: judged again alone if another server moved it
        meanwhile (as in `_applied`), else the error, naming the session as the client does."""
        if isinstance(error, SessionNotFoundError):
            return SessionNotFoundError(job.session_id)
        if not isinstance(error, SessionMovedError):
            return error
        try:
            return await self._applied(job)
        except Exception as again:
            return again

    async def _locked(self, session_id: str, key: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        self._admission.check_open()
        check_session_id(session_id)
        async with self._admission.hold(key):
            try:
                return await operation()
            except SessionNotFoundError:  # the store knows the key; the client, its session id
                raise SessionNotFoundError(session_id) from None


def _refuse(jobs: dict[int, Job], refused: Mapping[int, Exception], outcomes: list[Outcome | None]) -> None:
    """Take the refused positions out of `jobs`, their errors into `outcomes`."""
    for index, error in refused.items():
        del jobs[index]
        outcomes[index] = error
