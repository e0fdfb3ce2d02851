"""Admission of the engine's calls: one at a time per session, counted in flight, refused when closing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator

from serving.domain.errors import ShuttingDownError

logger = logging.getLogger(__name__)


class Admission:
    """Holds a session's lock around each call on it, and counts the calls in flight so a close can drain."""

    def __init__(self) -> None:
        self._locks = KeyedLocks()
        self._inflight = 0
        self._drained = asyncio.Event()
        self._closing = False

    @property
    def is_open(self) -> bool:
        """Whether calls are still admitted (`close` has not begun)."""
        return not self._closing

    def check_open(self) -> None:
        """Raise `ShuttingDownError` once `close` has begun."""
        if self._closing:
            raise ShuttingDownError()

    def hold(self, session_id: str) -> Held:
        """`async with admission.hold(session_id)`: the call runs alone on its session, counted in flight.

        No suspension before the lock is queued for, so the calls of a session run in the order they arrived.
        """
        return Held(self, session_id)

    @contextlib.asynccontextmanager
    async def hold_all(self, session_ids: list[str]) -> AsyncIterator[None]:
        """`hold` of many sessions at once (a frame's: distinct ids), one call in flight.

        Every lock is queued for before any is waited on, so calls meet on each session in arrival order and
        two calls holding several sessions each cannot wait on each other in a circle."""
        self._inflight += 1
        queued = self._locks.queue_all(session_ids)
        held: list[str] = []
        try:
            for key, turn in queued:
                if turn is not None:
                    await turn
                held.append(key)
            yield
        finally:
            for key, turn in queued[len(held) :]:  # not waited for (cancelled meanwhile): held, or given up
                if turn is None or (turn.done() and not turn.cancelled()):
                    held.append(key)
                else:
                    turn.cancel()
            for key in held:
                self._locks.release(key)
            self._leave()

    async def close(self, grace_s: float) -> None:
        """Admit nothing more; wait up to `grace_s` for the calls in flight to finish."""
        self._closing = True
        if not self._inflight:
            return
        self._drained.clear()
        try:
            await asyncio.wait_for(self._drained.wait(), grace_s)
        except TimeoutError:
            logger.warning("%d chunks still running after the %.1f s grace period", self._inflight, grace_s)

    async def _enter(self, session_id: str) -> None:
        self._inflight += 1
        try:
            await self._locks.acquire(session_id)
        except BaseException:
            self._leave()
            raise

    def _exit(self, session_id: str) -> None:
        self._locks.release(session_id)
        self._leave()

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._drained.set()


class Held:
    """One admitted call (an async context manager; built for every chunk, so a slotted class)."""

    __slots__ = ("_admission", "_session_id")

    def __init__(self, admission: Admission, session_id: str) -> None:
        self._admission, self._session_id = admission, session_id

    async def __aenter__(self) -> None:
        await self._admission._enter(self._session_id)

    async def __aexit__(self, *exc: object) -> None:
        self._admission._exit(self._session_id)


class KeyedLocks:
    """One FIFO lock per key, kept only while held. Taken for every chunk, so an uncontended acquire is a dict
    insert: no asyncio.Lock, no future, no suspension, no queue until a second caller waits."""

    def __init__(self) -> None:
        # Present: held. The waiters' queue is made by the first waiter.
        self._waiters: dict[str, collections.deque[asyncio.Future[None]] | None] = {}

    async def acquire(self, key: str) -> None:
        """Wait until `key` is free, then hold it."""
        future = self.queue(key)
        if future is None:
            return
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # handed the lock as this waiter was cancelled: pass it on
            raise

    def queue(self, key: str) -> asyncio.Future[None] | None:
        """Take `key` now if it is free (None), else join its queue: the future resolves when it is held."""
        if key not in self._waiters:
            self._waiters[key] = None
            return None
        waiters = self._waiters[key]
        if waiters is None:
            waiters = self._waiters[key] = collections.deque()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        return future

    def queue_all(self, keys: list[str]) -> list[tuple[str, asyncio.Future[None] | None]]:
        """`queue` for each of `keys` (distinct), in order; when none is held, all are taken in one update."""
        if self._waiters.keys().isdisjoint(keys):
            self._waiters.update(dict.fromkeys(keys))
            return [(key, None) for key in keys]
        return [(key, self.queue(key)) for key in keys]

    def release(self, key: str) -> None:
        """Free `key`: the next waiter, in arrival order, holds it now."""
        waiters = self._waiters[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():  # a cancelled waiter's future is done: skip it
                future.set_result(None)  # the lock passes straight to the next waiter, in arrival order
                return
        del self._waiters[key]
