"""Requests whose bytes are not the protobuf message they claim to be: INVALID_ARGUMENT, never UNKNOWN.

grpcio parses a request before any handler runs; a DecodeError there escapes as UNKNOWN with a Python class
name in the message, the code that means the server is broken. This interceptor parses leniently instead:
bytes that do not parse become a `Malformed`, which a unary call refuses as INVALID_ARGUMENT, and which the
Stream answers in band (its other chunks go on).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from serving.server.interceptor import FACTORIES, Behavior


class Malformed(NamedTuple):
    """A request whose bytes did not parse as `message_type`."""

    message_type: str
    reason: str

    def describe(self) -> str:
        """The message the client gets."""
        return f"the request is not a valid {self.message_type} message ({self.reason})"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses every request leniently; refuses an unparseable unary request with INVALID_ARGUMENT."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        """The handler with a lenient deserializer (and, for unary requests, a refusal of `Malformed`)."""
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        for kind, factory in FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                parse = _lenient(handler.request_deserializer)
                wrapped = _refusing(behavior) if kind.startswith("unary") else behavior
                return factory(wrapped, parse, handler.response_serializer)
        return handler


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)
    message_type = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "protobuf")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Malformed(message_type, str(exc).rpartition(": ")[2] or "it does not parse")

    return parse


def _refusing(behavior: Behavior) -> Behavior:
    async def refusing(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await behavior(request, context)

    return refusing
