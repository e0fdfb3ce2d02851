"""What every protocol's servicer shares: its bidirectional streams (read in order, answered concurrently
through an outbox that bounds what a stream holds), the count of chunks answered, and the caller's tenant.

Conveyor's own Stream and Frames and the Open Inference Protocol's ModelStreamInfer are streams of this kind;
they differ only in how a request is answered and in their messages for an ended session and for a request
that does not parse (`StreamKind`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, NoReturn

import grpc

from serving.domain.errors import UnauthenticatedError
from serving.domain.models import Models, Version
from serving.domain.sessions.store import SessionEnd
from serving.server.auth import Tenants
from serving.server.malformed import Malformed
from serving.server.metrics import NO_VERSION, ConveyorMetrics
from serving.server.outbox import Message, Outbox, StreamLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamKind(Generic[Message]):
    """What a kind of stream does with its requests: their cost (bytes held until answered), their answer
    (received at, outbox, tenant, cost), its message for an ended session, and for a request that does not
    parse (received at)."""

    cost: Callable[[Any], int]
    answer: Callable[[Any, float, Outbox[Message], str, int], Coroutine[Any, Any, None]]
    notice: Callable[[SessionEnd], Message | None]
    refuse: Callable[[Malformed, float], Message]


class Streams:
    """The open streams of every servicer of one server: their limits, the bytes they hold, their end."""

    def __init__(self, models: Models, limits: StreamLimits) -> None:
        self._models = models
        self._limits = limits
        self._outboxes: set[Outbox[Any]] = set()

    async def serve(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        namespace: str,
        kind: StreamKind[Message],
    ) -> AsyncIterator[Message]:
        """The responses of one stream: each request answered as `kind` says, concurrently, in the order they
        are ready."""
        if len(self._outboxes) >= self._limits.max_streams:
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, self._full())
        loop = asyncio.get_running_loop()
        outbox = Outbox(self._limits, loop, kind.notice)
        self._outboxes.add(outbox)
        reader = loop.create_task(self._read(requests, outbox, loop, namespace, kind))
        try:
            async for response in outbox:
                yield response
        finally:
            reader.cancel()
            self._outboxes.discard(outbox)
            self._models.unwatch(outbox.touched, outbox.watcher, namespace)

    def held_bytes(self) -> int:
        """Bytes the open streams hold for requests not yet answered and answers not yet sent."""
        return sum(outbox.held_bytes for outbox in self._outboxes)

    def close(self) -> None:
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
        kind: StreamKind[Message],
    ) -> None:
        # Tasks are made through `loop`: asyncio.create_task would look the loop up (a system call) each time.
        # They start in the order read, and a session's lock is queued for before any suspension, so the
        # requests of one session are applied in the order they came.
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                received = time.perf_counter()
                if isinstance(request, Malformed):  # answered in band: the stream's other requests go on
                    await outbox.reserve(0)  # its bytes are gone; its error is a few dozen
                    outbox.answer(kind.refuse(request, received), 0)
                    continue
                cost = kind.cost(request)
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

    def _full(self) -> str:
        return (
            f"the server has {self._limits.max_streams} streams open, its limit (CONVEYOR_MAX_STREAMS): "
            "close one, or send several sessions' chunks on one stream"
        )


class ChunkCounter:
    """The one place chunks are counted, whatever protocol they came by."""

    def __init__(self, metrics: ConveyorMetrics) -> None:
        self._metrics = metrics

    def count(
        self,
        received: float,
        failed: Iterable[grpc.StatusCode] = (),
        answered: int = 0,
        version: Version | None = None,
    ) -> None:
        """Chunks answered since `received`, of `version` (None: they failed before reaching one): each
        failed one by its code, the `answered` ones together."""
        elapsed = time.perf_counter() - received
        labels = NO_VERSION if version is None else version.labels
        for code in failed:
            self._metrics.chunk_answered(elapsed, code.name, labels=labels)
        if answered:
            self._metrics.chunk_answered(elapsed, chunks=answered, labels=labels)


async def namespace_of(tenants: Tenants | None, context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant ("" without authentication); the call fails UNAUTHENTICATED without a known
    token."""
    if tenants is None:
        return ""
    try:
        return tenants.identify(context.invocation_metadata() or ()).name
    except UnauthenticatedError as exc:
        # Counted per RPC (grpc_server_handled_total), not as a chunk: a model query or a whole stream refused
        # here is no chunk, and would skew the chunk error ratio.
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message`."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker so


class ServingParts(NamedTuple):
    """What every protocol's servicer works with: the models, their streams, the chunk count, the tenants
    (None: no authentication, one namespace)."""

    models: Models
    streams: Streams
    counter: ChunkCounter
    tenants: Tenants | None
