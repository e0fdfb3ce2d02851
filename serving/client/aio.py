"""The asyncio Conveyor client: many sessions multiplexed over one bidirectional Stream, packed into the
columnar frames of the Frames RPC, or sent one unary Step each.

    async with AsyncConveyorClient("localhost:50051") as client:
        await client.wait_for_ready(timeout_s=10)
        async with client.session() as session:
            logits = await session.send(np.array([3, 14, 15]))

Every request on the Stream gets exactly one answer, matched by request_id, so concurrent sessions share one
call. When the Stream breaks, the requests waiting on it fail as UNAVAILABLE and are retried, with the same
offset, on a fresh Stream; the server's replay cache makes that exactly-once (see serving.client). Sessions
made with via="frames" (gateway code: many devices, one client) send their chunks through `FramePacker`: the
chunks submitted in one loop pass go as one frame per chunk length, with no delay added.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Self, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from serving.client.calls import FRAMES, STREAM, BidiCall
from serving.client.core import (
    DEFAULT_OPTIONS,
    ClientOptions,
    ConveyorError,
    ModelInfo,
    ModelVersion,
    Outputs,
    ReadinessCheck,
    Snapshot,
    call_metadata,
    retry_delay,
)
from serving.client.cursor import SessionCursor, SessionHandle, not_found_is_ended
from serving.client.frames import FramePacker
from serving.wire import pb, pb_grpc

T = TypeVar("T")
Via = Literal["stream", "frames", "step"]


class AsyncConveyorClient:
    """An asyncio client for one Conveyor server (one channel, one shared Stream). Create it inside a loop."""

    def __init__(self, target: str, options: ClientOptions = DEFAULT_OPTIONS) -> None:
        self.target = target
        self.options = options
        self._channel: grpc.aio.Channel = options.open_channel(grpc.aio, target)
        self._stub = pb_grpc.ConveyorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stream: BidiCall[pb.ChunkRequest, pb.ChunkResponse] | None = None
        self._frames: BidiCall[pb.Frame, pb.FrameResult] | None = None
        self._packer = FramePacker(self._send_frame)
        self._route_key = options.route_key or uuid.uuid4().hex  # one key: every stream goes the same way
        self._request_ids = itertools.count()
        # Live cursors by session id, so in-band SessionEnded notices reach their sessions.
        self._cursors: weakref.WeakValueDictionary[str, SessionCursor] = weakref.WeakValueDictionary()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the Stream and the channel; sessions stay alive on the server until ended or expired."""
        for call in (self._stream, self._frames):
            if call is not None:
                await call.close()
        await self._channel.close()

    async def wait_for_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until the server's health service says SERVING; ConveyorError(UNAVAILABLE) after timeout_s."""
        check, health = ReadinessCheck(self.target, self.options, timeout_s), self._health
        while (remaining_s := check.remaining_s()) > 0:
            try:
                answer = await health.Check(check.request, timeout=remaining_s, wait_for_ready=True)
            except grpc.RpcError as exc:
                answer = exc
            if check.ready(answer):
                return
            await asyncio.sleep(check.pause_s())
        raise check.timed_out()

    async def model_info(self) -> ModelInfo:
        """Describe the served model."""
        return ModelInfo.from_proto(await self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest()))

    async def models(self) -> list[ModelVersion]:
        """Every model version the server holds, with its state."""
        listed: pb.ListModelsResponse = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelVersion.from_proto(version) for version in listed.versions]

    def session(
        self,
        session_id: str | None = None,
        *,
        outputs: Outputs = Outputs.ALL,
        reset: bool = False,
        via: Via = "stream",
    ) -> AsyncSession:
        """A new session, started by its first send (server-issued id when session_id is None).

        via="stream" sends its chunks over the shared Stream, via="frames" packed into frames with the chunks
        of other sessions sent in the same loop pass, via="step" as one unary Step call each.
        """
        return AsyncSession(self, SessionCursor(session_id, outputs, reset=reset), via)

    def attach(
        self, session_id: str, offset: int, *, outputs: Outputs = Outputs.ALL, via: Via = "stream"
    ) -> AsyncSession:
        """A live session started elsewhere (another call, connection or process), going on at `offset`."""
        return AsyncSession(self, SessionCursor(session_id, outputs, offset=offset, started=True), via)

    def restore(
        self,
        snapshot: Snapshot,
        session_id: str | None = None,
        *,
        outputs: Outputs = Outputs.ALL,
        via: Via = "stream",
    ) -> AsyncSession:
        """A session that resumes from `snapshot` with its first send (on this or any same-model server)."""
        cursor = SessionCursor(session_id, outputs, offset=snapshot.steps, snapshot=snapshot.blob)
        return AsyncSession(self, cursor, via)

    async def stream_chunk(self, request: pb.ChunkRequest) -> pb.ChunkResponse:
        """Send one raw chunk request over the shared Stream, retrying retryable failures."""
        return await self._retrying(
            lambda: self._open_stream().send(request, self.options.timeout_s), request
        )

    async def frame_chunk(self, request: pb.ChunkRequest) -> pb.ChunkResponse:
        """Send one raw chunk request packed into a frame with the others of this loop pass, retrying
        retryable failures (of its frame, or of its own session)."""
        return await self._retrying(lambda: self._packer.submit(request), request)

    async def frame(self, frame: pb.Frame) -> pb.FrameResult:
        """Send one frame (many sessions' chunks, columnar) over the shared Frames stream, retrying when the
        stream breaks; errors of single sessions come back in the result."""
        return await self._retrying(lambda: self._send_frame(frame), frame)

    async def step(self, request: pb.ChunkRequest) -> pb.ChunkResponse:
        """Send one raw chunk request as a unary Step call, retrying retryable failures."""
        return await self._unary(self._stub.Step, request)

    async def end_session(self, session_id: str) -> int:
        """End a session and free its state; returns the timesteps it had consumed."""
        reply: pb.EndSessionResponse = await self._unary(
            self._stub.EndSession, pb.EndSessionRequest(session_id=session_id)
        )
        return reply.steps

    async def snapshot(self, session_id: str) -> Snapshot:
        """Export a live session's state."""
        reply = await self._unary(self._stub.Snapshot, pb.SnapshotRequest(session_id=session_id))
        return Snapshot(reply.snapshot, reply.steps)

    def watch(self, cursor: SessionCursor) -> None:
        """Route the Stream's SessionEnded notices for cursor's session to it."""
        if cursor.session_id:
            self._cursors[cursor.session_id] = cursor

    def _open_stream(self) -> BidiCall[pb.ChunkRequest, pb.ChunkResponse]:
        if self._stream is None or self._stream.broken is not None:
            metadata = call_metadata(self.options, self._route_key)
            self._stream = BidiCall(self._stub, STREAM, metadata, self._session_ended)
        return self._stream

    async def _send_frame(self, frame: pb.Frame) -> pb.FrameResult:
        # The server cuts a result larger than what this channel receives into parts, which the call joins.
        frame.max_result_bytes = frame.max_result_bytes or self.options.max_message_bytes
        return await self._open_frames().send(frame, self.options.timeout_s)

    def _open_frames(self) -> BidiCall[pb.Frame, pb.FrameResult]:
        if self._frames is None or self._frames.broken is not None:
            metadata = call_metadata(self.options, self._route_key)
            self._frames = BidiCall(self._stub, FRAMES, metadata, self._session_ended)
        return self._frames

    def _session_ended(self, notice: pb.SessionEnded) -> None:
        cursor = self._cursors.pop(notice.session_id, None)
        if cursor is not None:
            cursor.ended = True
            cursor.end_reason = pb.EndReason.Name(notice.reason).removeprefix("END_REASON_").lower()

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        metadata = call_metadata(self.options, getattr(request, "session_id", ""))
        return await self._retrying(
            lambda: method(request, timeout=self.options.timeout_s, metadata=metadata), request
        )

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], request: Any) -> T:
        backoffs = self.options.retry.backoffs()
        self.options.address(request)
        while True:
            if isinstance(request, pb.ChunkRequest):
                request.request_id = str(next(self._request_ids))
            elif isinstance(request, pb.Frame):
                request.frame_id = str(next(self._request_ids))
            try:
                return await attempt()
            except (grpc.RpcError, ConveyorError) as exc:
                delay = retry_delay(exc, backoffs)
            await asyncio.sleep(delay)


class AsyncSession(SessionHandle):
    """One sequence streamed in chunks over an AsyncConveyorClient; tracks the offset, ends on `with` exit."""

    def __init__(self, client: AsyncConveyorClient, cursor: SessionCursor, via: Via) -> None:
        super().__init__(cursor)
        self._client = client
        self._send = {"stream": client.stream_chunk, "frames": client.frame_chunk, "step": client.step}[via]

    @property
    def end_reason(self) -> str | None:
        """Why the server ended the session ("end", "ttl", ...), when a Stream notice said so."""
        return self.cursor.end_reason

    async def send(self, chunk: np.ndarray | list[Any], *, end: bool = False) -> np.ndarray:
        """Apply the next chunk; returns its outputs, (time, outputs) or (1, outputs) float32, read-only.

        `chunk` is (time,) token ids or (time, features) floats. `end=True` frees the session with this chunk.
        """
        outputs = self.cursor.accept(await self._send(self.cursor.request(chunk, end)))
        if not self.cursor.ended:
            self._client.watch(self.cursor)
        return outputs

    async def snapshot(self) -> Snapshot:
        """Export the session's state, to restore later with AsyncConveyorClient.restore."""
        return await self._client.snapshot(self.cursor.require_started())

    async def end(self) -> None:
        """Free the session's state on the server (no-op when it never started or already ended)."""
        session_id = self.cursor.close()
        if session_id:
            try:
                await self._client.end_session(session_id)
            except ConveyorError as exc:
                not_found_is_ended(exc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.end()
