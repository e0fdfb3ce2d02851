"""The gRPC servicer: protobuf in, engine call, protobuf out. The one place domain errors become status codes.

Deadlines: grpcio cancels a handler whose deadline passes; the engine commits a chunk's state only after its
run, so a cancelled chunk leaves its session as it was and a retry with the same offset is exactly-once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc

from serving._proto.conveyor.v1 import conveyor_pb2 as pb
from serving._proto.conveyor.v1 import conveyor_pb2_grpc as pb_grpc
from serving.chunks import Chunk, ChunkResult, OutputMode
from serving.engine import Engine, Watcher
from serving.errors import (
    CapacityExceededError,
    ConveyorError,
    InvalidChunkError,
    InvalidSessionIdError,
    InvalidSnapshotError,
    OffsetMismatchError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
    ShuttingDownError,
    SnapshotModelMismatchError,
)
from serving.metrics import ConveyorMetrics
from serving.sessions import EndReason, SessionEnd
from serving.tensors import TensorDecodeError, decode

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

STATUS_CODES: dict[type[ConveyorError], grpc.StatusCode] = {
    InvalidChunkError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSessionIdError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSnapshotError: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFoundError: grpc.StatusCode.NOT_FOUND,
    SessionAlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    OffsetMismatchError: grpc.StatusCode.ABORTED,
    SnapshotModelMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_REASONS = {
    EndReason.END: pb.END_REASON_END,
    EndReason.TTL: pb.END_REASON_TTL,
    EndReason.LIFETIME: pb.END_REASON_LIFETIME,
    EndReason.CAPACITY: pb.END_REASON_CAPACITY,
    EndReason.SHUTDOWN: pb.END_REASON_SHUTDOWN,
}
_OUTPUT_MODES = {pb.OUTPUT_MODE_ALL: OutputMode.ALL, pb.OUTPUT_MODE_LAST: OutputMode.LAST}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`; unexpected errors become a logged INTERNAL."""
    code = STATUS_CODES.get(type(error)) if isinstance(error, ConveyorError) else None
    if code is None:
        logger.error("unexpected error while handling a request", exc_info=error)
        return grpc.StatusCode.INTERNAL, "internal server error (logged on the server)"
    return code, str(error)


def chunk_from_pb(request: pb.ChunkRequest) -> Chunk:
    """The domain chunk of a request; `InvalidChunkError` when its tensor or output mode does not parse."""
    try:
        inputs = decode(request.inputs)
    except TensorDecodeError as exc:
        raise InvalidChunkError(f"inputs: {exc}") from exc
    mode = _OUTPUT_MODES.get(request.outputs)
    if mode is None:
        raise InvalidChunkError(f"unknown outputs mode {request.outputs}")
    return Chunk(
        session_id=request.session_id,
        inputs=inputs,
        offset=request.offset,
        start=request.start,
        end=request.end,
        reset=request.reset,
        snapshot=request.snapshot,
        outputs=mode,
    )


def result_to_pb(
    result: ChunkResult, request_id: str, response: pb.ChunkResponse | None = None
) -> pb.ChunkResponse:
    """The response message of a chunk's result, written into `response` when given (e.g. a StreamResponse's
    `chunk`): a nested message assigned whole would be copied, and this runs for every chunk."""
    response = pb.ChunkResponse() if response is None else response
    response.session_id = result.session_id
    response.request_id = request_id
    response.offset = result.offset
    response.steps = result.steps
    response.ended = result.ended
    response.replayed = result.replayed
    # The engine's outputs are always float32: the fields go straight in, without building a Tensor to copy.
    outputs = response.outputs
    outputs.dtype = pb.DTYPE_FLOAT32
    outputs.shape[:] = result.outputs.shape
    outputs.data = result.outputs.astype("<f4", copy=False).tobytes()
    return response


class ConveyorServicer(pb_grpc.ConveyorServicer):
    """Implements conveyor.v1.Conveyor on top of an `Engine`."""

    def __init__(self, engine: Engine, metrics: ConveyorMetrics, *, max_inflight_per_stream: int) -> None:
        self._engine = engine
        self._metrics = metrics
        self._window = max_inflight_per_stream
        self._outboxes: set[_Outbox] = set()

    async def Stream(  # noqa: N802 (gRPC method names)
        self, request_iterator: AsyncIterator[pb.ChunkRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """Answers each request in band, concurrently across sessions; tells the stream of ended sessions."""
        loop = asyncio.get_running_loop()
        outbox = _Outbox(self._window, loop)
        self._outboxes.add(outbox)
        reader = loop.create_task(self._read(request_iterator, outbox, loop))
        try:
            async for response in outbox:
                yield response
        finally:
            reader.cancel()
            self._outboxes.discard(outbox)
            self._engine.unwatch(outbox.touched, outbox.watcher)

    async def Step(self, request: pb.ChunkRequest, context: grpc.aio.ServicerContext) -> pb.ChunkResponse:  # noqa: N802
        """One chunk; errors are the call's status."""
        response = pb.ChunkResponse()
        error = await self._answer(request, time.perf_counter(), response)
        if error is not None:
            await _abort(context, _BY_NUMBER[error.code], error.message)
        return response

    async def EndSession(  # noqa: N802
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        """Ends a session."""
        steps = await _unary(context, self._engine.end_session(request.session_id))
        return pb.EndSessionResponse(steps=steps)

    async def Snapshot(  # noqa: N802
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> pb.SnapshotResponse:
        """Exports a session's state."""
        blob, steps = await _unary(context, self._engine.snapshot(request.session_id))
        return pb.SnapshotResponse(snapshot=blob, steps=steps)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describes the served model."""
        model = self._engine.model
        spec = model.spec
        return pb.ModelInfo(
            name=spec.name,
            task=spec.task,
            input_kind=spec.input_kind,
            input_size=spec.input_size,
            output_size=spec.output_size,
            output_meaning=spec.output_meaning,
            output_labels=spec.output_labels,
            vocabulary=spec.vocabulary,
            fingerprint=spec.fingerprint,
            layers=spec.layers,
            hidden=spec.hidden,
            max_chunk_steps=model.max_chunk_steps,
            idle_ttl_s=model.idle_ttl_s,
        )

    def close_streams(self) -> None:
        """End every open stream once what is queued for it (e.g. shutdown notices) has been sent."""
        loop = asyncio.get_running_loop()
        for outbox in self._outboxes:
            loop.call_soon(outbox.finish)  # after the notices the engine scheduled before this call

    async def _read(
        self, requests: AsyncIterator[pb.ChunkRequest], outbox: _Outbox, loop: asyncio.AbstractEventLoop
    ) -> None:
        # Tasks are made through `loop`: asyncio.create_task would look the loop up (a system call) each time.
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                received = time.perf_counter()
                await outbox.reserve()
                task = loop.create_task(self._answer_in_band(request, received, outbox))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        except Exception as exc:  # the client's side of the stream broke; nothing more will be read
            logger.debug("stream read ended: %r", exc)
        finally:
            for task in tasks:
                task.cancel()
            outbox.finish()

    async def _answer_in_band(self, request: pb.ChunkRequest, received: float, outbox: _Outbox) -> None:
        response = pb.StreamResponse()
        error = await self._answer(request, received, response.chunk, outbox.watcher)
        if error is not None:
            outbox.answer(pb.StreamResponse(error=error))
        else:
            outbox.touched.add(response.chunk.session_id)
            outbox.answer(response)

    async def _answer(
        self,
        request: pb.ChunkRequest,
        received: float,
        response: pb.ChunkResponse,
        watcher: Watcher | None = None,
    ) -> pb.ChunkError | None:
        """Write the chunk's result into `response`, or return its error."""
        try:
            result = await self._engine.step(chunk_from_pb(request), watcher)
        except Exception as exc:
            code, message = status_for(exc)
            self._metrics.chunk_answered(time.perf_counter() - received, code.name)
            return pb.ChunkError(
                session_id=request.session_id,
                request_id=request.request_id,
                code=code.value[0],
                message=message,
            )
        result_to_pb(result, request.request_id, response)
        self._metrics.chunk_answered(time.perf_counter() - received)
        return None


async def _unary(context: grpc.aio.ServicerContext, call: Awaitable[_T]) -> _T:
    try:
        return await call
    except Exception as exc:
        await _abort(context, *status_for(exc))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker so


class _Outbox:
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
        notice = pb.SessionEnded(
            session_id=ended.session_id, reason=_REASONS[ended.reason], steps=ended.steps
        )
        self._put((pb.StreamResponse(session_ended=notice), False))

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
