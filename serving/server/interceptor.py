"""Per-RPC metrics (`grpc_server_handled_total`, `grpc_server_handling_seconds`) from an interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from serving.server.metrics import ConveyorMetrics

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records `grpc_server_handled_total` and `grpc_server_handling_seconds` for every RPC."""

    def __init__(self, metrics: ConveyorMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        """Wrap the RPC's handler so its end is recorded with its status code."""
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        for kind, factory in FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = self._wrap(behavior, service, method, streams=kind.endswith("_stream"))
                return factory(wrapped, handler.request_deserializer, handler.response_serializer)
        return handler

    def _wrap(self, behavior: Behavior, service: str, method: str, *, streams: bool) -> Behavior:
        record = self._metrics.rpc_handled
        if streams:  # the handler is an async generator, or returns an async iterator

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, error = time.perf_counter(), None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    record(service, method, _code(context, error), time.perf_counter() - started)

            return streamed

        async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, error = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(service, method, _code(context, error), time.perf_counter() - started)

        return awaited


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()  # set by abort() or set_code(); None when the handler left it alone
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if error is None or isinstance(error, GeneratorExit):
        return "OK"
    # A client that went away cancels the handler; grpcio reports any other escaped exception as UNKNOWN.
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"
