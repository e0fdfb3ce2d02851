"""The session contract, with no gRPC in it: ids, start/end/reset/restore, offsets, exactly-once retries,
per-session ordering, lifecycle notices and shutdown. The servicer translates; this decides.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from serving.batcher import Batcher
from serving.chunks import Chunk, ChunkResult, ModelInfo, OutputMode, check_session_id, validate
from serving.errors import (
    OffsetMismatchError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
    ShuttingDownError,
)
from serving.sessions import EndReason, Replay, SessionEnd, SessionStore

logger = logging.getLogger(__name__)

Watcher = Callable[[SessionEnd], None]
_T = TypeVar("_T")


class SessionMetrics(Protocol):
    """What the engine reports; `serving.metrics.ConveyorMetrics` implements it."""

    def session_started(self) -> None:
        """A session was created."""

    def session_ended(self, reason: str, duration_s: float, steps: int) -> None:
        """A session ended."""

    def chunk_applied(self, timesteps: int) -> None:
        """A chunk was run and its state committed (replays are not counted)."""


class _Job(NamedTuple):  # a tuple: built for every chunk, and cheaper to build than a frozen dataclass
    session_id: str
    chunk: Chunk
    key: bytes  # replay key: identifies a repeat of the same chunk
    watcher: Watcher | None


class Engine:
    """Applies chunks to sessions under the session contract, one chunk per session at a time."""

    def __init__(
        self, model: ModelInfo, store: SessionStore, batcher: Batcher, metrics: SessionMetrics
    ) -> None:
        self.model = model
        self._store = store
        self._batcher = batcher
        self._metrics = metrics
        self._locks = _KeyedLocks()
        # Most sessions are watched by one stream: that watcher is the value itself, a set only for several.
        self._watchers: dict[str, Watcher | set[Watcher]] = {}
        self._inflight = 0
        self._drained = asyncio.Event()
        self._closing = False
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        store.add_listener(self._on_end)

    def start_sweeper(self, interval_s: float) -> None:
        """Look for expired sessions every `interval_s`, so they end (and are told) without being touched."""
        self._sweeper = asyncio.create_task(self._sweep_forever(interval_s), name="conveyor-sweeper")

    async def step(self, chunk: Chunk, watcher: Watcher | None = None) -> ChunkResult:
        """Apply `chunk` (or answer its repeat); `watcher` is then told when the session ends.

        Raises a `ConveyorError` subclass on any contract violation, leaving the session's state unchanged.
        """
        self._check_open()
        validate(chunk, self.model)
        session_id = chunk.session_id or uuid.uuid4().hex
        job = _Job(session_id, chunk, _replay_key(chunk), watcher)
        # No suspension before the lock is queued for: chunks of a session queue in the order they arrived.
        async with _Held(self, session_id):
            return await (self._start(job) if chunk.start else self._continue(job))

    async def end_session(self, session_id: str) -> int:
        """End a live session; returns its step count."""
        return (await self._locked(session_id, lambda: self._store.end(session_id, EndReason.END))).steps

    async def snapshot(self, session_id: str) -> tuple[bytes, int]:
        """The session's state as an opaque blob, and its step count."""
        return await self._locked(session_id, lambda: self._store.snapshot(session_id))

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher) -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        for session_id in session_ids:
            watchers = self._watchers.get(session_id)
            if isinstance(watchers, set):
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[session_id]
            elif watchers == watcher:
                del self._watchers[session_id]

    async def close(self, grace_s: float) -> None:
        """Refuse new work, give in-flight chunks `grace_s` to finish, then end every session (shutdown)."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._inflight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace_s)
            except TimeoutError:
                logger.warning(
                    "%d chunks still running after the %.1f s grace period", self._inflight, grace_s
                )
        self._closed = True
        self._store.end_all(EndReason.SHUTDOWN)

    async def _start(self, job: _Job) -> ChunkResult:
        existing = self._store.find(job.session_id)
        if existing is not None:
            replayed = _replayed(job, existing.replay, existing.steps, ended=False)
            if replayed is not None:
                self._watch(job)
                return replayed
            if not job.chunk.reset:
                raise SessionAlreadyExistsError(job.session_id, existing.steps)
        else:
            self._store.check_capacity(job.session_id)
        state, steps = self._store.initial(job.chunk.snapshot)
        return await self._apply(job, state, steps, new=True)

    async def _continue(self, job: _Job) -> ChunkResult:
        session = self._store.find(job.session_id)
        if session is None:
            return self._replay_ended(job)
        replayed = _replayed(job, session.replay, session.steps, ended=False)
        if replayed is not None:
            self._watch(job)
            return replayed
        return await self._apply(job, session.state, session.steps, new=False)

    def _replay_ended(self, job: _Job) -> ChunkResult:
        """Answer again the chunk that ended its session (a retry after its response was lost); anything else
        for a session that is not live is `SessionNotFoundError`."""
        ended = self._store.ended_replay(job.session_id)
        replayed = None if ended is None else _replayed(job, ended.replay, ended.steps, ended=True)
        if replayed is None:
            raise SessionNotFoundError(job.session_id)
        return replayed

    async def _apply(self, job: _Job, state: np.ndarray, steps: int, *, new: bool) -> ChunkResult:
        chunk = job.chunk
        if chunk.offset != steps:
            raise OffsetMismatchError(job.session_id, chunk.offset, steps)
        y, new_state = await self._batcher.run(chunk.inputs, state)
        if self._closed:
            raise ShuttingDownError()  # the grace period ran out: every session has ended
        # A copy: the batcher's rows are views of the whole batch's outputs.
        outputs = (y[-1:] if chunk.outputs is OutputMode.LAST else y).copy()
        steps += len(chunk.inputs)
        created = self._store.put(
            job.session_id, new_state, steps, Replay(job.key, chunk.offset, outputs), new=new
        )
        if created:
            self._metrics.session_started()
        self._metrics.chunk_applied(len(chunk.inputs))
        self._watch(job)
        if chunk.end:
            self._store.end(job.session_id, EndReason.END, keep_replay=True)
        return ChunkResult(job.session_id, chunk.offset, steps, outputs, chunk.end, replayed=False)

    async def _locked(self, session_id: str, operation: Callable[[], _T]) -> _T:
        self._check_open()
        check_session_id(session_id)
        async with _Held(self, session_id):
            return operation()

    def _watch(self, job: _Job) -> None:
        watcher = job.watcher
        if watcher is None:
            return
        watchers = self._watchers.setdefault(job.session_id, watcher)
        if isinstance(watchers, set):
            watchers.add(watcher)
        elif watchers != watcher:
            self._watchers[job.session_id] = {watchers, watcher}

    def _on_end(self, ended: SessionEnd) -> None:
        self._metrics.session_ended(ended.reason.value, ended.duration_s, ended.steps)
        watchers = self._watchers.pop(ended.session_id, None)
        if watchers is not None:
            # Told soon, not now: a chunk that ended its session is answered before the notice goes out.
            loop = asyncio.get_running_loop()
            for watcher in watchers if isinstance(watchers, set) else (watchers,):
                loop.call_soon(watcher, ended)

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDownError()

    def _untrack(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._drained.set()

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                for _ in self._store.sweep():
                    await asyncio.sleep(0)  # chunks go on between slices of a long sweep
            except Exception:  # a failed sweep must not stop later ones
                logger.exception("session sweep failed")


def _replayed(job: _Job, replay: Replay | None, steps: int, *, ended: bool) -> ChunkResult | None:
    """The cached result when `job` repeats the chunk `replay` records, else None."""
    if replay is None or replay.offset != job.chunk.offset or replay.key != job.key:
        return None
    return ChunkResult(job.session_id, replay.offset, steps, replay.outputs, ended, replayed=True)


def _replay_key(chunk: Chunk) -> bytes:
    # The shape needs no place in the key: a valid chunk's shape follows from its byte length and the model.
    flags = chunk.start | chunk.end << 1 | chunk.reset << 2 | (chunk.outputs is OutputMode.LAST) << 3
    payload = b"".join((bytes((flags,)), chunk.inputs.tobytes(), chunk.snapshot))
    return hashlib.blake2b(payload, digest_size=16).digest()


class _Held:
    """`async with`: the engine counts the call as in flight and holds the session's lock for its duration."""

    __slots__ = ("_engine", "_key")

    def __init__(self, engine: Engine, key: str) -> None:
        self._engine, self._key = engine, key

    async def __aenter__(self) -> None:
        self._engine._inflight += 1
        try:
            await self._engine._locks.acquire(self._key)
        except BaseException:
            self._engine._untrack()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._engine._locks.release(self._key)
        self._engine._untrack()


class _KeyedLocks:
    """One FIFO lock per key, kept only while held. Taken for every chunk, so an uncontended acquire is a dict
    insert: no asyncio.Lock, no future, no suspension."""

    def __init__(self) -> None:
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}  # present: held

    async def acquire(self, key: str) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = collections.deque()
            return
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # handed the lock as this waiter was cancelled: pass it on
            raise

    def release(self, key: str) -> None:
        waiters = self._waiters[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():  # a cancelled waiter's future is done: skip it
                future.set_result(None)  # the lock passes straight to the next waiter, in arrival order
                return
        del self._waiters[key]
