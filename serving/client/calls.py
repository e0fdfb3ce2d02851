"""One open bidirectional call (Stream or Frames) and the requests awaiting their answers on it.

Both RPCs answer every request exactly once, matched by an id the request carries (ChunkRequest.request_id,
Frame.frame_id), with a result or an in-band ChunkError, and may send SessionEnded notices between answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from serving.client.core import ConveyorError
from serving.client.frames import join_parts
from serving.wire import pb

Request = TypeVar("Request", pb.ChunkRequest, pb.Frame)
Answer = TypeVar("Answer", pb.ChunkResponse, pb.FrameResult)

_CLOSE_GRACE_S = 1.0


@dataclass(frozen=True)
class CallKind:
    """What differs between the two RPCs: the stub method, the request's id, the answer that is a result."""

    method: str  # "Stream" | "Frames"
    id_field: str  # "request_id" | "frame_id"
    result_kind: str  # the response's oneof field holding a result: "chunk" | "result"
    in_parts: bool = False  # a result may come in parts (FrameResult.more), joined before it is answered


STREAM = CallKind("Stream", "request_id", "chunk")
FRAMES = CallKind("Frames", "frame_id", "result", in_parts=True)


class BidiCall(Generic[Request, Answer]):
    """One open call; once broken, never reused."""

    def __init__(
        self,
        stub: Any,
        kind: CallKind,
        metadata: tuple[tuple[str, str], ...],
        on_ended: Callable[[pb.SessionEnded], None],
    ) -> None:
        self._kind = kind
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[Answer]] = {}
        self._parts: dict[str, list[Any]] = {}  # the parts of results still coming, by request id
        self._on_ended = on_ended
        self._call = getattr(stub, kind.method)(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())
        self.broken: ConveyorError | None = None

    async def send(self, request: Request, timeout_s: float) -> Answer:
        """Send one request and wait for its answer; an in-band error is raised as ConveyorError."""
        if self.broken is not None:
            raise self.broken
        key = getattr(request, self._kind.id_field)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self._outbox.put_nowait(request)
        try:
            # Not asyncio.wait_for: on 3.11 it drops a cancellation that arrives in the loop pass that brings
            # the answer, and the cancelled caller runs on (the soak found a session streaming forever).
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise ConveyorError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s}s") from None
        finally:
            self._pending.pop(key, None)

    async def close(self) -> None:
        """Half-close, let the server answer what it has, then stop reading."""
        self._outbox.put_nowait(None)
        _, unfinished = await asyncio.wait({self._reader}, timeout=_CLOSE_GRACE_S)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[Request]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure = ConveyorError(grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        try:
            async for message in self._call:
                self._dispatch(message)
        except grpc.RpcError as exc:
            # Whatever the status, the answers still owed are lost, not refused: resending them (same offsets)
            # on a fresh call is safe, so the failure is reported as retryable.
            failure = ConveyorError(
                grpc.StatusCode.UNAVAILABLE, f"the stream broke: {exc.code().name}: {exc.details()}"
            )
        finally:
            self.broken = failure
            self._outbox.put_nowait(None)  # ends the request generator, which grpc would leave waiting
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)

    def _dispatch(self, message: Any) -> None:
        kind = message.WhichOneof("kind")
        if kind == "session_ended":
            self._on_ended(message.session_ended)
            return
        result = kind == self._kind.result_kind
        answer = getattr(message, kind)
        key = getattr(answer, self._kind.id_field if result else "request_id")
        if result and self._kind.in_parts and (answer.more or key in self._parts):
            self._parts.setdefault(key, []).append(answer)
            if answer.more:
                return
            answer = join_parts(self._parts.pop(key))
        future = self._pending.get(key)
        if future is None or future.done():
            return  # its sender gave up (deadline or cancellation)
        if result:
            future.set_result(answer)
        else:
            future.set_exception(ConveyorError.from_chunk_error(message.error))
