"""One stream's outgoing messages and its flow control, apart from the servicer that fills it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from serving.domain.notices import Watcher
from serving.domain.sessions.store import SessionEnd
from serving.wire import oip, pb

Message = TypeVar("Message", pb.StreamResponse, pb.FrameResponse, oip.ModelStreamInferResponse)

# A stream's answers are `ahead` of a new one (`serving.domain.backlog`) while more than this many wait to be
# sent: a batch released as the queue drains to it is answered while that many are still being sent.
_AHEAD = 1


@dataclass(frozen=True)
class StreamLimits:
    """What streams may hold: together, at most `max_streams` x max(`max_bytes`, one chunk's cost)."""

    window: int  # unanswered chunks per stream
    max_bytes: int  # bytes of unanswered or unsent chunks per stream (see `chunk_cost`)
    max_streams: int  # streams open at once


def chunk_cost(request: pb.ChunkRequest | pb.Frame, output_size: int, max_steps: int) -> int:
    """Bytes a stream holds for `request` (a chunk, or a frame of chunks) until its answer is sent: the
    request itself and the largest response it can get (float32 outputs for each of its timesteps, or for the
    last one; a frame's inputs are [sessions, time, ...])."""
    shape = list(request.inputs.shape)
    rows = 1
    if isinstance(request, pb.Frame):
        rows, shape = (max(shape[0], 1), shape[1:]) if shape else (1, shape)
    every_step = request.outputs != pb.OUTPUT_MODE_LAST
    steps = min(max(shape[0], 1), max_steps) if shape and every_step else 1
    return request.ByteSize() + 4 * output_size * steps * rows


class Outbox(Generic[Message]):
    """One stream's outgoing messages in the order they were produced, and the chunks it may still take.

    Each chunk read holds a cost (its request and the largest response it can get, in bytes) until its answer
    is sent. Reading stops while `window` chunks are unanswered or `max_bytes` are held, but a stream holding
    nothing always takes its next chunk, whatever its size: a client that does not read its responses makes
    the server hold at most max(`max_bytes`, one chunk) for it, and gRPC's flow control then stops its writes.

    A deque and one future rather than an asyncio.Queue: every message passes through here, and each
    Queue.get asks asyncio for the running loop, which costs a system call. It is also the `Backlog` its
    chunks' answers join: the batcher holds a chunk for company while answers wait ahead of its own."""

    def __init__(
        self,
        limits: StreamLimits,
        loop: asyncio.AbstractEventLoop,
        notice: Callable[[SessionEnd], Message | None],
    ) -> None:
        self._queue: collections.deque[tuple[Message, int] | None] = collections.deque()
        # The message telling that a session ended (None: this kind of stream is not told of that end).
        self._notice: Callable[[SessionEnd], Message | None] = notice
        self._loop = loop
        self._ready: asyncio.Future[None] | None = None  # the sender waits on it while the queue is empty
        self._room: asyncio.Future[None] | None = None  # the reader waits on it while the stream is full
        self._drained: Callable[[], None] | None = None  # told once the queue is down to `_AHEAD`
        self._window = limits.window
        self._max_bytes = limits.max_bytes
        self._unanswered = 0
        self.held_bytes = 0  # the unanswered and unsent chunks' costs
        self.touched: set[str] = set()  # sessions this stream used: the engine tells it when they end
        # One callable for all of them: each `self.notify` would be a new bound method, kept per session.
        self.watcher: Watcher = self.notify

    async def reserve(self, cost: int) -> None:
        """Wait for room for a chunk of `cost` bytes: a client that does not read its responses is not read
        either."""
        while self._unanswered and (
            self._unanswered >= self._window or self.held_bytes + cost > self._max_bytes
        ):
            self._room = self._loop.create_future()
            await self._room
        self._unanswered += 1
        self.held_bytes += cost

    def ahead(self) -> bool:
        """Whether more than `_AHEAD` messages wait to be sent (`serving.domain.backlog.Backlog`)."""
        return len(self._queue) > _AHEAD

    def on_drain(self, wake: Callable[[], None]) -> None:
        """Call `wake` once, when no more than `_AHEAD` messages wait to be sent (at once if that is so)."""
        if self.ahead():
            self._drained = wake
        else:
            wake()

    def answer(self, response: Message, cost: int) -> None:
        """Queue the response or error of a chunk `reserve`d at `cost`."""
        self._put((response, cost))

    def notify(self, ended: SessionEnd) -> None:
        """Queue the notice that a session this stream used has ended (no chunk's answer: it costs none)."""
        self.touched.discard(ended.session_id)
        notice = self._notice(ended)
        if notice is not None:
            self._put((notice, -1))

    def finish(self) -> None:
        """No more messages: the stream ends after what is queued."""
        self._put(None)

    def _put(self, item: tuple[Message, int] | None) -> None:
        self._queue.append(item)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _sent(self, cost: int) -> None:
        self._unanswered -= 1
        self.held_bytes -= cost
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def __aiter__(self) -> AsyncIterator[Message]:
        queue = self._queue
        while True:
            while not queue:
                self._ready = self._loop.create_future()
                await self._ready
            item = queue.popleft()
            if self._drained is not None and len(queue) <= _AHEAD:
                wake, self._drained = self._drained, None
                wake()
            if item is None:
                return
            response, cost = item
            yield response
            if cost >= 0:
                self._sent(cost)  # sent: its bytes are gRPC's now, under the client's flow control
