"""One stream's outgoing messages and its flow control, apart from the servicer that fills it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from serving.domain.notices import Watcher
from serving.domain.sessions.store import SessionEnd
from serving.server.translate import end_notice
from serving.wire import pb


class Outbox:
    """One stream's outgoing messages in the order they were produced, and its window of unanswered chunks.

    A deque and one future rather than an asyncio.Queue: every message passes through here, and each
    Queue.get asks asyncio for the running loop, which costs a system call."""

    def __init__(self, window: int, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: collections.deque[tuple[pb.StreamResponse, bool] | None] = collections.deque()
        self._loop = loop
        self._ready: asyncio.Future[None] | None = None  # the sender waits on it while the queue is empty
        self._window = asyncio.Semaphore(window)
        self.touched: set[str] = set()  # sessions this stream used: the engine tells it when they end
        # One callable for all of them: each `self.notify` would be a new bound method, kept per session.
        self.watcher: Watcher = self.notify

    async def reserve(self) -> None:
        """Wait for room in the window: a client that does not read its responses is not read either."""
        await self._window.acquire()

    def answer(self, response: pb.StreamResponse) -> None:
        """Queue a chunk's response or error."""
        self._put((response, True))

    def notify(self, ended: SessionEnd) -> None:
        """Queue the notice that a session this stream used has ended."""
        self.touched.discard(ended.session_id)
        self._put((end_notice(ended), False))

    def finish(self) -> None:
        """No more messages: the stream ends after what is queued."""
        self._put(None)

    def _put(self, item: tuple[pb.StreamResponse, bool] | None) -> None:
        self._queue.append(item)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def __aiter__(self) -> AsyncIterator[pb.StreamResponse]:
        queue = self._queue
        while True:
            while not queue:
                self._ready = self._loop.create_future()
                await self._ready
            item = queue.popleft()
            if item is None:
                return
            response, is_answer = item
            yield response
            if is_answer:
                self._window.release()  # sent: one more chunk may be read
