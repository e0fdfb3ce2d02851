"""The session contract, with no gRPC in it: ids, start/end/reset/restore, offsets, exactly-once retries,
per-session ordering and shutdown. The servicer translates; this orders, locks and batches the chunks, and is
the one reader and writer of the sessions; `serving.domain.contract` judges each chunk against its session as
found here, and says what its run leaves in the store.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

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
    continued_digests,
    session_key,
    validate,
)
from serving.domain.contract import (
    Continued,
    Contract,
    Job,
    Outcome,
    Run,
    SessionMetrics,
    answered,
    continues,
)
from serving.domain.errors import ServingError, SessionMovedError, SessionNotFoundError, ShuttingDownError
from serving.domain.frames import Frame, FrameOutcome, keys_of, refused
from serving.domain.locks import Admission
from serving.domain.notices import Watcher
from serving.domain.sessions.lifecycle import Sessions
from serving.domain.sessions.replays import EndedReplay
from serving.domain.sessions.store import EndReason, Session, SessionEnd
from serving.domain.stepping import BlockResult, Stepper

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
        self._stepper = Stepper(batcher, model.spec)
        self._metrics = metrics
        self._contract = Contract(model, metrics, quotas)
        for listener in self._contract.listeners():
            sessions.add_listener(listener)
        self._admission = Admission()
        self._closed = False  # set once every session has ended at shutdown: nothing more is committed
        self._new_refused: ServingError | None = None  # set while the version drains: no new sessions

    @property
    def accepting(self) -> bool:
        """Whether new chunks are taken (false once a graceful stop has begun)."""
        return self._admission.is_open

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

    async def step_frame(self, frame: Frame, watcher: Watcher | None = None) -> FrameOutcome:
        """Apply one chunk for each of many sessions (a frame), the runnable ones as one batch with whatever
        else waits, under `step`'s contract session by session; each session's outcome. A session's error is
        its own: the others go on.

        The frame stays columns (`serving.domain.frames`): checked column by column, its sessions looked up
        and committed in one store call each, and a session continuing at its step count answered without an
        object of its own."""
        self._admission.check_open()
        outputs = self._stepper.most_outputs(frame.inputs.shape[1])
        outcome = FrameOutcome.pending(frame, self.model.spec.output_size, outputs, self.model.framed)
        keys = keys_of(frame, outcome)
        outcome.errors.update(refused(frame, keys, self.model))
        rows = [row for row in range(len(keys)) if row not in outcome.errors]
        call = _FrameCall(frame, outcome, keys, watcher)
        held = [keys[row] for row in rows]
        async with self._admission.hold_all(held):
            found = await self._sessions.find_many(held)
            plan = self._plan(call, dict(zip(rows, found, strict=True)))
            if plan.continued or plan.runs:
                await self._run_frame(call, plan)
        outcome.settle(frame)
        return outcome

    async def end_session(self, session_id: str, namespace: str = "") -> int:
        """End a live session of tenant `namespace`; returns its step count."""
        key = session_key(namespace, session_id)
        ended = await self._locked(session_id, key, lambda: self._sessions.end(key, EndReason.END))
        return ended.steps

    async def snapshot(self, session_id: str, namespace: str = "") -> tuple[bytes, int]:
        """The session's state as an opaque blob, and its step count."""
        key = session_key(namespace, session_id)
        session = await self._locked(session_id, key, lambda: self._sessions.get(key))
        return self._contract.snapshot(session), session.steps

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher, namespace: str = "") -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        self._contract.unwatch([session_key(namespace, s) for s in session_ids], watcher)

    @property
    def live_sessions(self) -> int:
        """Sessions live in this engine's store."""
        return len(self._sessions)

    async def count_live(self) -> int:
        """Sessions live in the store as it stands now (a shared store: on every server), the expired ended
        first."""
        await self._sessions.sweep()  # a shared store's count is refreshed by its sweeps
        return len(self._sessions)

    async def holds(self, session_id: str, namespace: str = "") -> bool:
        """Whether the session is live here."""
        return await self._sessions.find(session_key(namespace, session_id)) is not None

    def on_end(self, listener: Callable[[SessionEnd], None]) -> None:
        """Call `listener` with every session that ends, whatever the reason."""
        self._sessions.add_listener(listener)

    def refuse_new(self, error: ServingError) -> None:
        """From now on a chunk that would create a session fails with `error` (its version drains); the live
        sessions go on."""
        self._new_refused = error

    def held_bytes(self) -> dict[str, int]:
        """Bytes held for this engine's sessions, by kind (`Sessions.held_bytes`)."""
        return self._sessions.held_bytes()

    async def close(self, grace_s: float) -> None:
        """Refuse new work and give in-flight chunks `grace_s` to finish. Then every session ends (shutdown),
        unless the store keeps them for the next server."""
        await self._stop(grace_s)
        await self._sessions.shutdown()

    async def retire(self, grace_s: float, end_left: bool) -> None:
        """As `close`, but with `end_left` every session left ends, durable store or not, with reason
        model_retired: the version is unloaded for good. Without, the store is left alone (a shared store
        may meanwhile hold sessions another server began on this version, while it had not yet loaded the one
        replacing it)."""
        await self._stop(grace_s)
        if end_left:
            await self._sessions.end_all(EndReason.MODEL_RETIRED)

    async def _stop(self, grace_s: float) -> None:
        self._sessions.stop_sweeper()
        await self._admission.close(grace_s)
        self._closed = True

    def _job(self, chunk: Chunk, watcher: Watcher | None, backlog: Backlog | None = None) -> Job:
        """The checked chunk."""
        validate(chunk, self.model)
        session_id = chunk.session_id or uuid.uuid4().hex
        key = session_key(chunk.namespace, session_id)
        return Job(session_id, key, chunk, chunk_digest(chunk), watcher, backlog)

    async def _apply_or_replay(self, job: Job) -> ChunkResult:
        found = await self._sessions.find(job.key)
        judged = self._contract.decide(job, found, self._ended(job.key, found))
        if isinstance(judged, ChunkResult):
            return judged
        self._admit(judged)
        y, new_state = await self._stepper.run(job.chunk.inputs, judged.state, judged.steps, job.backlog)
        [result] = await self._commit([judged], [answered(job.chunk, y)], [new_state])
        if isinstance(result, Exception):
            raise result
        self._metrics.chunks_applied(len(job.chunk.inputs))
        return result

    def _ended(self, key: str, found: Session | None) -> EndedReplay | None:
        """The replay a session that is not live (`found` None) left when it ended, if still kept."""
        return None if found is not None else self._sessions.ended_replay(key)

    def _admit(self, run: Run) -> None:
        """`CapacityExceededError` when `run` would create a session and no more fit; the drain's error when
        it would create one while the version drains."""
        if run.previous is None:
            if self._new_refused is not None:
                raise self._new_refused
            self._sessions.check_capacity()

    async def _commit(
        self,
        runs: Sequence[Run],
        outputs: Sequence[np.ndarray],
        new_states: Sequence[np.ndarray] | np.ndarray,
    ) -> list[Outcome]:
        """Store each run's `outputs` (as answered: the caller's own copies, kept for a replay) and new state
        as the successor of its `previous` (None: new), in one store call, and end the sessions whose last
        chunk it was; each run's result, or the error of its session alone."""
        if self._closed:  # the grace period ran out: every session has ended
            return [ShuttingDownError() for _ in runs]
        limit = self.model.replay_max_bytes
        commits = [
            run.commit(y, state, limit) for run, y, state in zip(runs, outputs, new_states, strict=True)
        ]
        stored = await self._sessions.commit_many(commits)
        outcomes: list[Outcome] = []
        for run, answer, commit, created in zip(runs, outputs, commits, stored, strict=True):
            if isinstance(created, Exception):
                outcomes.append(created)
                continue
            self._contract.stored(run.job, created)
            ended = await self._end_last(run.job) if run.job.chunk.end else None
            outcomes.append(ended or run.result(commit.steps, answer))
        return outcomes

    async def _commit_continued(
        self, continued: Continued, new_states: np.ndarray
    ) -> list[ServingError | None]:
        """Store chunks that continued their sessions (`continues`: nothing to judge), as columns, in one
        store call: for each, None when stored, else the error of its session alone."""
        if self._closed:
            return [ShuttingDownError() for _ in continued.keys]
        replays = self._contract.replays(continued)
        refused = await self._sessions.advance(
            continued.keys, continued.found, new_states, continued.time, replays
        )
        self._contract.continued_stored(continued, refused)
        return refused

    async def _end_last(self, job: Job) -> ServingError | None:
        """End the session whose last chunk `job` was (its answer kept for a retry); None, or why not."""
        try:
            await self._sessions.end(job.key, EndReason.END, keep_replay=True)
        except ServingError as error:
            return error
        return None

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

    def _plan(self, call: _FrameCall, found: dict[int, Session | None]) -> _Plan:
        """What runs of the rows `found` (each row's session as found), and from what: a session continuing at
        its step count, from its state; any other row is judged as the chunk it is (a start, a repeat answered
        again, an error)."""
        plan = _Plan()
        continuing = call.frame.continuing()
        for row, session in found.items():
            if continuing[row] and continues(session, call.frame.offsets[row]):
                plan.continued[row] = session
                continue
            try:
                judged = self._contract.decide(call.job(row), session, self._ended(call.keys[row], session))
                if isinstance(judged, Run):
                    self._admit(judged)
            except ServingError as error:
                call.outcome.errors[row] = error
                continue
            if isinstance(judged, Run):
                plan.runs[row] = judged
            else:
                call.outcome.write(row, judged)
        return plan

    async def _run_frame(self, call: _FrameCall, plan: _Plan) -> None:
        """Run the planned rows as one block (continued sessions first) and commit them, or fail them all
        with the run."""
        rows, inputs = plan.rows, call.frame.inputs
        # Every row continued (the usual frame): they are the frame's rows in order, so no copy is needed.
        x = inputs if len(plan.continued) == len(inputs) else inputs[rows]
        states = [session.state for session in plan.continued.values()]
        states += [run.state for run in plan.runs.values()]
        offsets = [session.steps for session in plan.continued.values()]
        offsets += [run.steps for run in plan.runs.values()]
        try:
            # np.array rather than np.stack: cheaper for many small rows of one shape (docs/benchmarks.md)
            block = await self._stepper.run_block(x, np.array(states), offsets)
        except Exception as error:  # the runtime failed: every session of the block stays as it was
            call.outcome.errors.update(dict.fromkeys(rows, error))
            return
        answers, counts = block.last() if call.frame.outputs is OutputMode.LAST else (block.ys, block.counts)
        call.outcome.record(rows, answers, counts)
        new_states = block.new_states
        split = len(plan.continued)
        applied = 0
        if split:
            continued = Continued(
                [call.keys[row] for row in plan.continued],
                list(plan.continued.values()),
                x.shape[1],
                answers[:split],
                continued_digests(x[:split], call.frame.outputs),
                call.watcher,
                None if counts is None else counts[:split],
            )
            failed = await self._commit_continued(continued, new_states[:split])
            applied += failed.count(None)
            await self._answer_continued(call, plan, x.shape[1], failed)
        if plan.runs:
            applied += await self._commit_runs(call, plan.runs, block, split)
        self._metrics.chunks_applied(x.shape[1], applied)

    async def _answer_continued(
        self, call: _FrameCall, plan: _Plan, time: int, failed: list[ServingError | None]
    ) -> None:
        """The continued sessions' answers: the steps they reached, or (their commit `failed`) the outcome of
        judging them again."""
        for (row, session), error in zip(plan.continued.items(), failed, strict=True):
            if error is None:
                call.outcome.steps[row] = session.steps + time
            else:
                call.outcome.answer(row, await self._recommitted(call.job(row), error))

    async def _commit_runs(
        self, call: _FrameCall, runs: dict[int, Run], block: BlockResult, split: int
    ) -> int:
        """Commit the runs of rows judged as chunks (the block's rows from `split` on) and answer them; how
        many were applied."""
        outputs = [answered(run.job.chunk, block.own(split + i)) for i, run in enumerate(runs.values())]
        committed = await self._commit(list(runs.values()), outputs, block.new_states[split:])
        for (row, run), result in zip(runs.items(), committed, strict=True):
            if not isinstance(result, ChunkResult):
                result = await self._recommitted(run.job, result)
            call.outcome.answer(row, result)
        return sum(isinstance(result, ChunkResult) for result in committed)

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


class _FrameCall(NamedTuple):
    """A frame being applied: what it asked, its outcome so far, its rows' keys, its stream's watcher."""

    frame: Frame
    outcome: FrameOutcome
    keys: list[str]
    watcher: Watcher | None

    def job(self, row: int) -> Job:
        """Row `row` as a chunk of its own (checked with the frame)."""
        chunk = self.frame.chunk(row)
        return Job(self.outcome.session_ids[row], self.keys[row], chunk, chunk_digest(chunk), self.watcher)


@dataclass
class _Plan:
    """A frame's rows that run: sessions continuing at their step count (as found), and the others' runs."""

    continued: dict[int, Session] = field(default_factory=dict)
    runs: dict[int, Run] = field(default_factory=dict)

    @property
    def rows(self) -> list[int]:
        """The rows in the order they run."""
        return [*self.continued, *self.runs]
