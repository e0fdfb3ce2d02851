"""The gRPC servicer: protobuf in, engine call, protobuf out (translated by `serving.server.translate`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc

from serving.domain.backlog import Backlog
from serving.domain.engine import Engine
from serving.domain.errors import InvalidChunkError, UnauthenticatedError
from serving.domain.notices import Watcher
from serving.domain.sessions.store import SessionEnd
from serving.server.auth import Tenants
from serving.server.malformed import Malformed
from serving.server.metrics import ConveyorMetrics
from serving.server.outbox import Message, Outbox, StreamLimits, chunk_cost
from serving.server.translate import (
    BY_NUMBER,
    check_result_fits,
    chunk_from_pb,
    end_notice,
    error_to_pb,
    frame_end_notice,
    frame_from_pb,
    frame_results_to_pb,
    malformed,
    model_info_to_pb,
    result_limit,
    result_to_pb,
    status_for,
)
from serving.wire import pb, pb_grpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class _BidiKind(Generic[Message]):
    """What Stream and Frames do differently: how a request is answered, and the stream's message for an
    ended session and for a request that does not parse."""

    answer: Callable[[Any, float, Outbox[Message], str, int], Coroutine[Any, Any, None]]
    notice: Callable[[SessionEnd], Message]
    refuse: Callable[[pb.ChunkError], Message]


def _stream_error(error: pb.ChunkError) -> pb.StreamResponse:
    return pb.StreamResponse(error=error)


def _frame_error(error: pb.ChunkError) -> pb.FrameResponse:
    return pb.FrameResponse(error=error)


class ConveyorServicer(pb_grpc.ConveyorServicer):
    """Implements conveyor.v1.Conveyor on top of an `Engine`."""

    def __init__(
        self,
        engine: Engine,
        metrics: ConveyorMetrics,
        *,
        stream_limits: StreamLimits,
        tenants: Tenants | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._tenants = tenants  # None: no authentication, one namespace
        self._stream_limits = stream_limits
        self._outboxes: set[Outbox[Any]] = set()
        model = engine.model
        self._chunk_cost_args = (model.spec.output_size, model.max_chunk_steps)
        self._chunks = _BidiKind(self._answer_in_band, end_notice, _stream_error)
        self._frames = _BidiKind(self._answer_frame, frame_end_notice, _frame_error)

    def Stream(  # noqa: N802 (gRPC method names)
        self, request_iterator: AsyncIterator[pb.ChunkRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """Answers each request in band, concurrently across sessions; tells the stream of ended sessions."""
        return self._bidi(request_iterator, context, self._chunks)

    def Frames(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FrameResponse]:
        """Answers each frame in band, concurrently across frames; tells the stream of ended sessions."""
        return self._bidi(request_iterator, context, self._frames)

    async def _bidi(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        kind: _BidiKind[Message],
    ) -> AsyncIterator[Message]:
        namespace = await self._namespace(context)
        if len(self._outboxes) >= self._stream_limits.max_streams:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, self._streams_full())
        loop = asyncio.get_running_loop()
        outbox = Outbox(self._stream_limits, loop, kind.notice)
        self._outboxes.add(outbox)
        reader = loop.create_task(self._read(requests, outbox, loop, namespace, kind))
        try:
            async for response in outbox:
                yield response
        finally:
            reader.cancel()
            self._outboxes.discard(outbox)
            self._engine.unwatch(outbox.touched, outbox.watcher, namespace)

    async def Step(self, request: pb.ChunkRequest, context: grpc.aio.ServicerContext) -> pb.ChunkResponse:  # noqa: N802
        """One chunk; errors are the call's status."""
        received = time.perf_counter()
        namespace = await self._namespace(context)
        response = pb.ChunkResponse()
        error = await self._answer(request, received, response, namespace)
        if error is not None:
            await _abort(context, BY_NUMBER[error.code], error.message)
        return response

    async def EndSession(  # noqa: N802
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        """Ends a session."""
        namespace = await self._namespace(context)
        steps = await _unary(context, self._engine.end_session(request.session_id, namespace))
        return pb.EndSessionResponse(steps=steps)

    async def Snapshot(  # noqa: N802
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> pb.SnapshotResponse:
        """Exports a session's state."""
        namespace = await self._namespace(context)
        blob, steps = await _unary(context, self._engine.snapshot(request.session_id, namespace))
        return pb.SnapshotResponse(snapshot=blob, steps=steps)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describes the served model."""
        await self._namespace(context)
        return model_info_to_pb(self._engine.model)

    def held_bytes(self) -> int:
        """Bytes the open streams hold for chunks not yet answered and answers not yet sent."""
        return sum(outbox.held_bytes for outbox in self._outboxes)

    def close_streams(self) -> None:
        """End every open stream once what is queued for it (e.g. shutdown notices) has been sent."""
        loop = asyncio.get_running_loop()
        for outbox in self._outboxes:
            loop.call_soon(outbox.finish)  # after the notices the engine scheduled before this call

    async def _read(
        self,
        requests: AsyncIterator[Any],
        outbox: Outbox[Message],
        loop: asyncio.AbstractEventLoop,
        namespace: str,
        kind: _BidiKind[Message],
    ) -> None:
        # Tasks are made through `loop`: asyncio.create_task would look the loop up (a system call) each time.
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                received = time.perf_counter()
                if isinstance(request, Malformed):  # answered in band: the stream's other chunks go on
                    await outbox.reserve(0)  # its bytes are gone; its error is a few dozen
                    outbox.answer(kind.refuse(self._failed(malformed(request), received)), 0)
                    continue
                cost = chunk_cost(request, *self._chunk_cost_args)
                await outbox.reserve(cost)
                task = loop.create_task(kind.answer(request, received, outbox, namespace, cost))
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

    async def _answer_in_band(
        self,
        request: pb.ChunkRequest,
        received: float,
        outbox: Outbox[pb.StreamResponse],
        namespace: str,
        cost: int,
    ) -> None:
        response = pb.StreamResponse()
        # The outbox is the queue the answer joins: behind other answers, the chunk may wait for company.
        error = await self._answer(request, received, response.chunk, namespace, outbox.watcher, outbox)
        if error is not None:
            outbox.answer(pb.StreamResponse(error=error), cost)
        else:
            outbox.touched.add(response.chunk.session_id)
            outbox.answer(response, cost)

    async def _answer_frame(
        self,
        frame: pb.Frame,
        received: float,
        outbox: Outbox[pb.FrameResponse],
        namespace: str,
        cost: int,
    ) -> None:
        """A frame's FrameResults (each session's chunk counted as a chunk answered), or its whole error."""
        try:
            columns = frame_from_pb(frame, namespace)
            limit = result_limit(frame)
            check_result_fits(frame, limit, self._engine.model.spec.output_size)
        except InvalidChunkError as exc:
            outbox.answer(pb.FrameResponse(error=self._failed(exc, received, frame.frame_id)), cost)
            return
        outcome = await self._engine.step_frame(columns, outbox.watcher)
        parts = frame_results_to_pb(frame.frame_id, outcome, limit)
        self._count(received, [error for part in parts for error in part.errors], outcome.answered)
        outbox.touched.update(
            session_id for index, session_id in enumerate(outcome.session_ids) if index not in outcome.errors
        )
        for part in parts[:-1]:  # the frame's cost is released with its last part
            outbox.answer(pb.FrameResponse(result=part), -1)
        outbox.answer(pb.FrameResponse(result=parts[-1]), cost)

    async def _answer(
        self,
        request: pb.ChunkRequest,
        received: float,
        response: pb.ChunkResponse,
        namespace: str,
        watcher: Watcher | None = None,
        backlog: Backlog | None = None,
    ) -> pb.ChunkError | None:
        """Write the chunk's result into `response`, or return its error."""
        try:
            result = await self._engine.step(chunk_from_pb(request, namespace), watcher, backlog)
        except Exception as exc:
            return self._failed(exc, received, request.request_id, request.session_id)
        result_to_pb(result, request.request_id, response)
        self._count(received, answered=1)
        return None

    def _failed(
        self, error: Exception, received: float, request_id: str = "", session_id: str = ""
    ) -> pb.ChunkError:
        """The message of a chunk (or frame, or unreadable message) that failed, counted as answered."""
        message = error_to_pb(error, request_id, session_id)
        self._count(received, [message])
        return message

    def _count(
        self, received: float, failed: Sequence[pb.ChunkError | pb.FrameError] = (), answered: int = 0
    ) -> None:
        """The one place chunks are counted: each failed one by its code, the `answered` ones together."""
        elapsed = time.perf_counter() - received
        for error in failed:
            self._metrics.chunk_answered(elapsed, BY_NUMBER[error.code].name)
        if answered:
            self._metrics.chunk_answered(elapsed, chunks=answered)

    async def _namespace(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant ("" without authentication); the call fails UNAUTHENTICATED without a known
        token."""
        if self._tenants is None:
            return ""
        try:
            return self._tenants.identify(context.invocation_metadata() or ()).name
        except UnauthenticatedError as exc:
            # Counted per RPC (grpc_server_handled_total), not as a chunk: GetModelInfo or a whole Stream
            # refused here is no chunk, and would skew the chunk error ratio.
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))

    def _streams_full(self) -> str:
        limit = self._stream_limits.max_streams
        return (
            f"the server has {limit} streams open, its limit (CONVEYOR_MAX_STREAMS): close one, or send "
            "several sessions' chunks on one stream"
        )


async def _unary(context: grpc.aio.ServicerContext, call: Awaitable[_T]) -> _T:
    try:
        return await call
    except Exception as exc:
        await _abort(context, *status_for(exc))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker so
