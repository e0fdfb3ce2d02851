"""The gRPC servicer: protobuf in, models call, protobuf out (translated by `serving.server.translate`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import grpc

from serving.domain.backlog import Backlog
from serving.domain.errors import ServingError
from serving.domain.models import Version
from serving.domain.notices import Watcher
from serving.server.malformed import Malformed
from serving.server.outbox import Message, Outbox, chunk_cost
from serving.server.streams import ServingParts, StreamKind, abort, namespace_of
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
    versions_to_pb,
)
from serving.wire import pb, pb_grpc

_T = TypeVar("_T")


class ConveyorServicer(pb_grpc.ConveyorServicer):
    """Implements conveyor.v1.Conveyor on top of the served `Models`."""

    def __init__(self, parts: ServingParts) -> None:
        self._models, self._streams, self._counter, self._tenants = parts
        models = self._models
        self._chunks = StreamKind(
            lambda request: chunk_cost(request, *models.output_bound),
            self._answer_in_band,
            end_notice,
            lambda request, received: pb.StreamResponse(error=self._refused(request, received)),
        )
        self._frames = StreamKind(
            lambda request: chunk_cost(request, *models.output_bound),
            self._answer_frame,
            frame_end_notice,
            lambda request, received: pb.FrameResponse(error=self._refused(request, received)),
        )

    def Stream(  # noqa: N802 (gRPC method names)
        self, request_iterator: AsyncIterator[pb.ChunkRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """Answers each request in band, concurrently across sessions; tells the stream of ended sessions."""
        return self._serve(request_iterator, context, self._chunks)

    def Frames(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FrameResponse]:
        """Answers each frame in band, concurrently across frames; tells the stream of ended sessions."""
        return self._serve(request_iterator, context, self._frames)

    async def _serve(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, kind: StreamKind[Message]
    ) -> AsyncIterator[Message]:
        namespace = await namespace_of(self._tenants, context)
        async for response in self._streams.serve(requests, context, namespace, kind):
            yield response

    async def Step(self, request: pb.ChunkRequest, context: grpc.aio.ServicerContext) -> pb.ChunkResponse:  # noqa: N802
        """One chunk; errors are the call's status."""
        received = time.perf_counter()
        namespace = await namespace_of(self._tenants, context)
        response = pb.ChunkResponse()
        error = await self._answer(request, received, response, namespace)
        if error is not None:
            await abort(context, BY_NUMBER[error.code], error.message)
        return response

    async def EndSession(  # noqa: N802
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        """Ends a session."""
        namespace = await namespace_of(self._tenants, context)
        ending = self._models.end_session(request.model, request.model_version, request.session_id, namespace)
        return pb.EndSessionResponse(steps=await _unary(context, ending))

    async def Snapshot(  # noqa: N802
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> pb.SnapshotResponse:
        """Exports a session's state."""
        namespace = await namespace_of(self._tenants, context)
        taking = self._models.snapshot(request.model, request.model_version, request.session_id, namespace)
        blob, steps = await _unary(context, taking)
        return pb.SnapshotResponse(snapshot=blob, steps=steps)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describes a served model version (by default the one a new session begins on)."""
        await namespace_of(self._tenants, context)
        try:
            version = self._models.describe(request.model, request.model_version)
        except Exception as exc:
            await abort(context, *status_for(exc))
        return model_info_to_pb(version.served.model, version.number, version.state.value)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every model version the server holds, with its state."""
        await namespace_of(self._tenants, context)
        return versions_to_pb(self._models)

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
            version = await self._models.route_frame(frame.model, frame.model_version, columns)
            limit = result_limit(frame)
            check_result_fits(frame, limit, version.served.model.spec.output_size)
        except ServingError as exc:
            outbox.answer(pb.FrameResponse(error=self._failed(exc, received, frame.frame_id)), cost)
            return
        try:
            outcome = await self._models.apply_frame(version, columns, outbox.watcher)
        except Exception as exc:  # a bug, not the client's: INTERNAL (logged), and the stream goes on
            outbox.answer(pb.FrameResponse(error=self._failed(exc, received, frame.frame_id)), cost)
            return
        parts = frame_results_to_pb(frame.frame_id, outcome, limit)
        for part in parts:
            part.model_version = version.number
        errors = [error for part in parts for error in part.errors]
        self._count(received, errors, outcome.answered, version)
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
            chunk = chunk_from_pb(request, namespace)
            version = await self._models.route(
                request.model, request.model_version, namespace, chunk.session_id, chunk.start
            )
        except Exception as exc:
            return self._failed(exc, received, request.request_id, request.session_id)
        try:
            result = await self._models.apply(version, chunk, watcher, backlog)
        except Exception as exc:
            return self._failed(exc, received, request.request_id, request.session_id, version)
        result_to_pb(result, request.request_id, response)
        response.model, response.model_version = version.name, version.number
        self._count(received, answered=1, version=version)
        return None

    def _failed(
        self,
        error: Exception,
        received: float,
        request_id: str = "",
        session_id: str = "",
        version: Version | None = None,
    ) -> pb.ChunkError:
        """The message of a chunk (or frame, or unreadable message) that failed, counted as answered (of
        `version`, when it reached one)."""
        message = error_to_pb(error, request_id, session_id)
        self._count(received, [message], version=version)
        return message

    def _refused(self, request: Malformed, received: float) -> pb.ChunkError:
        return self._failed(malformed(request), received)

    def _count(
        self,
        received: float,
        failed: Sequence[pb.ChunkError | pb.FrameError] = (),
        answered: int = 0,
        version: Version | None = None,
    ) -> None:
        self._counter.count(received, [BY_NUMBER[error.code] for error in failed], answered, version)


async def _unary(context: grpc.aio.ServicerContext, call: Awaitable[_T]) -> _T:
    try:
        return await call
    except Exception as exc:
        await abort(context, *status_for(exc))
