"""The asyncio Conveyor client: many sessions multiplexed over one bidirectional Stream, or per-call Step.

    async with AsyncConveyorClient("localhost:50051") as client:
        await client.wait_for_ready(timeout_s=10)
        async with client.session() as session:
            logits = await session.send(np.array([3, 14, 15]))

Every request on the Stream gets exactly one answer, matched by request_id, so concurrent sessions share one
call. When the Stream breaks, the requests waiting on it fail as UNAVAILABLE and are retried, with the same
offset, on a fresh Stream; the server's replay cache makes that exactly-once (see serving.client).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Self, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from serving.client.core import (
    DEFAULT_OPTIONS,
    ClientOptions,
    ConveyorError,
    ModelInfo,
    Outputs,
    ReadinessCheck,
    Snapshot,
    call_metadata,
    retry_delay,
)
from serving.client.cursor import SessionCursor, SessionHandle, not_found_is_ended
from serving.wire import pb, pb_grpc

T = TypeVar("T")
Via = Literal["stream", "step"]

_CLOSE_GRACE_S = 1.0


class _Stream:
    """One open Stream call and the requests awaiting their answers on it; once broken, never reused."""

    def __init__(
        self, stub: Any, metadata: tuple[tuple[str, str], ...], on_ended: Callable[[pb.SessionEnded], None]
    ) -> None:
        self._outbox: asyncio.Queue[pb.ChunkRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[pb.ChunkResponse]] = {}
        self._on_ended = on_ended
        self._call = stub.Stream(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())
        self.broken: ConveyorError | None = None

    async def send(self, request: pb.ChunkRequest, timeout_s: float) -> pb.ChunkResponse:
        """Send one request and wait for its answer; an in-band error is raised as ConveyorError."""
        if self.broken is not None:
            raise self.broken
        future = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._outbox.put_nowait(request)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise ConveyorError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s}s") from None
        finally:
            self._pending.pop(request.request_id, None)

    async def close(self) -> None:
        """Half-close, let the server answer what it has, then stop reading."""
        self._outbox.put_nowait(None)
        _, unfinished = await asyncio.wait({self._reader}, timeout=_CLOSE_GRACE_S)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[pb.ChunkRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure = ConveyorError(grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        try:
            async for message in self._call:
                self._dispatch(message)
        except grpc.RpcError as exc:
            # Whatever the status, the answers still owed are lost, not refused: resending them (same offsets)
            # on a fresh Stream is safe, so the failure is reported as retryable.
            failure = ConveyorError(
                grpc.StatusCode.UNAVAILABLE, f"the stream broke: {exc.code().name}: {exc.details()}"
            )
        finally:
            self.broken = failure
            self._outbox.put_nowait(None)  # ends the request generator, which grpc would leave waiting
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)

    def _dispatch(self, message: pb.StreamResponse) -> None:
        kind = message.WhichOneof("kind")
        if kind == "session_ended":
            self._on_ended(message.session_ended)
            return
        answer = message.chunk if kind == "chunk" else message.error
        future = self._pending.get(answer.request_id)
        if future is None or future.done():
            return  # its sender gave up (deadline or cancellation)
        if kind == "chunk":
            future.set_result(message.chunk)
        else:
            future.set_exception(ConveyorError.from_chunk_error(message.error))


class AsyncConveyorClient:
    """An asyncio client for one Conveyor server (one channel, one shared Stream). Create it inside a loop."""

    def __init__(self, target: str, options: ClientOptions = DEFAULT_OPTIONS) -> None:
        self.target = target
        self.options = options
        self._channel: grpc.aio.Channel = options.open_channel(grpc.aio, target)
        self._stub = pb_grpc.ConveyorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stream: _Stream | None = None
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
        if self._stream is not None:
            await self._stream.close()
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

    def session(
        self,
        session_id: str | None = None,
        *,
        outputs: Outputs = Outputs.ALL,
        reset: bool = False,
        via: Via = "stream",
    ) -> AsyncSession:
        """A new session, started by its first send (server-issued id when session_id is None).

        via="stream" sends its chunks over the shared Stream, via="step" as one unary Step call each.
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

    def _open_stream(self) -> _Stream:
        if self._stream is None or self._stream.broken is not None:
            metadata = call_metadata(self.options, self._route_key)
            self._stream = _Stream(self._stub, metadata, self._session_ended)
        return self._stream

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
        while True:
            if isinstance(request, pb.ChunkRequest):
                request.request_id = str(next(self._request_ids))
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
        self._send = client.stream_chunk if via == "stream" else client.step

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
