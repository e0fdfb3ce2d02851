"""The load process's clients: each session keeps one chunk in flight (a closed loop), its next chunk leaving
when its response arrives, so `sessions` is the concurrency. Sessions are spread over `channels` connections,
one Stream call each (one_stream: every session multiplexed on one); frames: one Frames call, the sessions in
as many frames as the job asks, taking turns. A paced part's sessions wait out their period between chunks
instead, and a part may start its sessions on a model version of its own (`serving.bench.grid.Part`). Raw
generated stubs on purpose: the figure should measure the server, not a client library.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from serving.bench.grid import BenchError, Cell, Part
from serving.bench.window import Window
from serving.bench.wire import stub
from serving.wire import pb, pb_grpc

_Message = TypeVar("_Message", pb.ChunkRequest, pb.Frame)


class _Feed:
    """One session's requests. Stateful: one session, offsets advancing, after an optional history prefix.
    Stateless: every call a fresh session (start + end) carrying the whole history, one new step credited.
    A session's start names `version` (later chunks leave it empty: the session is pinned to it)."""

    def __init__(self, key: str, cell: Cell, inputs: Callable[[int], pb.Tensor], version: str = "") -> None:
        self.key = key
        self._version = version
        self.sent_s = 0.0
        self.credit = 0  # steps the pending response is worth
        self._stateless = cell.mode == "stateless"
        self._calls = 0
        self._offset = 0
        self._chunk = inputs(cell.chunk_steps)
        self._first = inputs(cell.history_steps) if cell.history_steps else self._chunk
        self._steps = cell.chunk_steps

    def next(self) -> pb.ChunkRequest:
        self._calls += 1
        self.sent_s = time.perf_counter()
        if self._stateless:
            self.credit = self._steps
            return pb.ChunkRequest(
                session_id=f"{self.key}.{self._calls}",
                inputs=self._first,
                start=True,
                end=True,
                outputs=pb.OUTPUT_MODE_LAST,
                request_id=self.key,
                model_version=self._version,
            )
        inputs = self._first if self._calls == 1 else self._chunk
        request = pb.ChunkRequest(
            session_id=self.key,
            inputs=inputs,
            offset=self._offset,
            start=self._calls == 1,
            request_id=self.key,
            model_version=self._version if self._calls == 1 else "",
        )
        self.credit = inputs.shape[0]
        self._offset += self.credit
        return request


async def _drive(
    service: pb_grpc.ConveyorAsyncStub, feeds: list[_Feed], window: Window, period_s: float = 0.0
) -> None:
    # Several sessions on the stream: requests go out through grpc's own writer task, so reading a response
    # never waits for the previous write to finish, as in a client with a reader thread (awaiting each write
    # before the next read kept all but 6-8 of 64 sessions on one stream out of the server, waiting here).
    # One session has nothing to overlap: a direct write spares it a hop through that task (unless paced: its
    # next chunk is put out later, by the loop).
    loop = asyncio.get_running_loop()
    requests: Requests[pb.ChunkRequest] | None = Requests(loop) if len(feeds) > 1 or period_s else None
    call = service.Stream(requests)
    for feed in feeds:
        await _send(call, requests, feed.next())
    by_key = {feed.key: feed for feed in feeds}
    async for answer in answers(call, "chunk"):
        feed = by_key[answer.request_id]
        window.record(time.perf_counter() - feed.sent_s, feed.credit)
        if requests is not None and period_s:
            _send_later(loop, requests, feed, feed.sent_s + period_s)
        else:
            await _send(call, requests, feed.next())


def _send_later(
    loop: asyncio.AbstractEventLoop, requests: Requests[pb.ChunkRequest], feed: _Feed, due_s: float
) -> None:
    """Put `feed`'s next chunk out at `due_s` (perf_counter seconds), or now if that has passed."""
    loop.call_later(max(due_s - time.perf_counter(), 0.0), lambda: requests.put(feed.next()))


async def answers(call: grpc.aio.StreamStreamCall, kind: str) -> AsyncIterator[Any]:
    """The stream's answers (its responses' `kind` field: chunk, or result); notices are skipped, and an error
    or the stream's end fails the cell."""
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise BenchError("the server ended a stream while the bench was driving it")
        which = response.WhichOneof("kind")
        if which == "error":
            raise BenchError(f"the server refused a chunk or frame: {response.error.message}")
        if which == kind:
            yield getattr(response, kind)


async def _send(
    call: grpc.aio.StreamStreamCall, requests: Requests[pb.ChunkRequest] | None, request: pb.ChunkRequest
) -> None:
    if requests is None:
        await call.write(request)
    else:
        requests.put(request)


class Requests(Generic[_Message]):
    """One Stream (or Frames) call's requests, as the async iterator grpc writes from (a deque and one
    future: cheaper than an asyncio.Queue)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: collections.deque[_Message] = collections.deque()
        self._loop = loop
        self._ready: asyncio.Future[None] | None = None

    def put(self, request: _Message) -> None:
        self._queue.append(request)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def __aiter__(self) -> AsyncIterator[_Message]:
        while True:
            while not self._queue:
                self._ready = self._loop.create_future()
                await self._ready
            yield self._queue.popleft()


class _FrameFeed:
    """A group of sessions that travel together: one frame per round, every session's chunk in it."""

    def __init__(self, key: str, sessions: int, cell: Cell, inputs: Callable[[int], pb.Tensor]) -> None:
        self.key = key
        self.sent_s = 0.0
        self.sessions = sessions
        self.steps = cell.chunk_steps
        chunk = inputs(sessions * cell.chunk_steps)  # [sessions * time, ...]: reshaped to the frame's shape
        self._frame = pb.Frame(frame_id=key, session_ids=[f"{key}.{i}" for i in range(sessions)])
        self._frame.inputs.CopyFrom(chunk)
        self._frame.inputs.shape[:] = [sessions, cell.chunk_steps, *chunk.shape[1:]]
        self._frame.start[:] = [True] * sessions
        self._offset = 0

    def next(self) -> pb.Frame:
        self.sent_s = time.perf_counter()
        if self._offset:
            del self._frame.start[:]
            self._frame.offsets[:] = [self._offset] * self.sessions
        self._offset += self.steps
        return self._frame


async def _drive_frames(service: pb_grpc.ConveyorAsyncStub, feeds: list[_FrameFeed], window: Window) -> None:
    requests: Requests[pb.Frame] = Requests(asyncio.get_running_loop())
    call = service.Frames(requests)
    for feed in feeds:
        requests.put(feed.next())
    by_key = {feed.key: feed for feed in feeds}
    async for result in answers(call, "result"):
        if result.errors:
            raise BenchError(f"the server refused a frame's chunk: {result.errors[0].message}")
        if result.more:
            continue  # a result over the receive limit comes in parts: the frame is answered with its last
        feed = by_key[result.frame_id]
        window.record(time.perf_counter() - feed.sent_s, feed.sessions * feed.steps, feed.sessions)
        requests.put(feed.next())


def start_drivers(
    part: Part,
    channels: list[grpc.aio.Channel],
    make: Callable[[int], pb.Tensor],
    window: Window,
    frames_in_flight: int,
) -> list[asyncio.Task[None]]:
    """Start the clients of `part` on `channels` (inputs from `make`, answers counted in `window`; frames:
    the sessions split into `frames_in_flight` frames); a task only ends by failing."""
    prefix, cell = uuid.uuid4().hex[:8], part.cell
    if cell.mode == "frames":
        if part.version or part.period_s:
            raise BenchError("frames parts run on the newest version, unpaced")
        groups = min(frames_in_flight, cell.sessions)
        sizes = [len(range(i, cell.sessions, groups)) for i in range(groups)]
        frames = [_FrameFeed(f"{prefix}-{i}", size, cell, make) for i, size in enumerate(sizes)]
        return [asyncio.create_task(_drive_frames(stub(channels[0]), frames, window))]
    feeds = [_Feed(f"{prefix}-{i}", cell, make, part.version) for i in range(cell.sessions)]
    return [
        asyncio.create_task(_drive(stub(channel), feeds[i :: len(channels)], window, part.period_s))
        for i, channel in enumerate(channels)
    ]
