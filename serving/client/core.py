"""What the sync and asyncio Conveyor clients share: errors, options, model info, readiness and routing.

Users import these names from `serving.client`; this module exists so that neither client depends on the
other.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from serving.wire import pb
from serving.wire.tensors import decode

# Session-affine routing: a proxy in front of several replicas hashes this header (nginx: `hash
# $http_x_conveyor_route consistent`), so a session's chunks keep reaching one server. Unary calls carry their
# session id; a stream, which may carry many sessions, carries a key of its client's.
ROUTE_HEADER = "x-conveyor-route"
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ConveyorError(Exception):
    """A call or a chunk failed: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """True when resending the same chunk with the same offset may succeed."""
        return self.code in _RETRYABLE

    @classmethod
    def from_exception(cls, error: grpc.RpcError | ConveyorError) -> ConveyorError:
        """The ConveyorError for a failed gRPC call (its status) or an already translated error."""
        if isinstance(error, ConveyorError):
            return error
        return cls(error.code(), error.details() or "")

    @classmethod
    def from_chunk_error(cls, error: pb.ChunkError) -> ConveyorError:
        """The ConveyorError for an in-band error on the Stream."""
        return cls(_CODES_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN), error.message)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a retryable failure is retried (same request, same offset)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoffs(self) -> Iterator[float]:
        """Seconds to wait before each retry: exponential, jittered so that clients do not retry in step."""
        for retry in range(self.max_attempts - 1):
            ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
            yield random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Tls:
    """TLS to the server: trust `ca` (a PEM file; None: the system's roots), and present `cert` with `key`
    where the server asks for client certificates (mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; `ConveyorError` (INVALID_ARGUMENT) naming a file that cannot be read."""
        if (self.cert is None) != (self.key is None):
            message = "a client certificate and its key go together: give both or neither"
            raise ConveyorError(grpc.StatusCode.INVALID_ARGUMENT, message)
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca), private_key=_pem(self.key), certificate_chain=_pem(self.cert)
        )


def _pem(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConveyorError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ClientOptions:
    """Channel and call settings shared by the sync and asyncio clients."""

    timeout_s: float = 30.0  # deadline of each unary call, and of each chunk's answer on the Stream
    retry: RetryPolicy = RetryPolicy()
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC's 4 MiB default is too small for long feature chunks
    health_service: str = ""  # "" asks about the whole server
    route_key: str | None = None  # the Stream's routing key (ROUTE_HEADER); None: one of the client's own
    tls: Tls | None = None  # None: plaintext
    token: str | None = None  # a bearer token, for a server with tenants (conveyor token makes one)
    model: str = ""  # the model, on a server of several (ListModels names them); "": the server's only one
    # The version new sessions begin on: a number or a label of the server's repository; "": the newest ready.
    # A session stays on the version it began on (its chunks then name that version).
    model_version: str = ""

    def address(self, request: Any) -> None:
        """Name the model in a request (a chunk, frame, model query, end or snapshot), and the version new
        sessions begin on in a start or a model query that names none."""
        if hasattr(request, "model") and not request.model:  # ListModelsRequest names none
            request.model = self.model
        starts = isinstance(request, pb.ChunkRequest) and request.start
        if (starts or isinstance(request, pb.ModelInfoRequest)) and not request.model_version:
            request.model_version = self.model_version

    def open_channel(self, grpc_module: Any, target: str) -> Any:
        """A channel to `target` made by `grpc_module` (grpc, or grpc.aio: the same two factories), with TLS
        when these options ask for it."""
        if self.tls is None:
            return grpc_module.insecure_channel(target, options=self.channel_options())
        return grpc_module.secure_channel(target, self.tls.credentials(), options=self.channel_options())

    def channel_options(self) -> list[tuple[str, Any]]:
        """The grpc channel arguments these options imply."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", "conveyor-client"),
        ]


DEFAULT_OPTIONS = ClientOptions()


class ReadinessCheck:
    """`wait_for_ready`, written once for both clients, which only do its I/O: ask the health service until
    it says SERVING; a retryable failure (not up yet) is asked again, any other is final; give up at the
    deadline with UNAVAILABLE."""

    POLL_S = 0.05  # how often the server is asked again while it is not SERVING

    def __init__(self, target: str, options: ClientOptions, timeout_s: float) -> None:
        self.request = health_pb2.HealthCheckRequest(service=options.health_service)
        self._target, self._timeout_s = target, timeout_s
        self._deadline = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        """Seconds left before giving up (<= 0: time is up)."""
        return self._deadline - time.monotonic()

    def pause_s(self) -> float:
        """How long to wait before asking again."""
        return min(self.POLL_S, max(0.0, self.remaining_s()))

    def ready(self, answer: health_pb2.HealthCheckResponse | grpc.RpcError) -> bool:
        """True when `answer` (a reply, or the call's failure) says SERVING; raises a final failure."""
        if isinstance(answer, grpc.RpcError):
            if not (error := ConveyorError.from_exception(answer)).retryable:
                raise error from None
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def timed_out(self) -> ConveyorError:
        """The error once the deadline has passed."""
        return ConveyorError(
            grpc.StatusCode.UNAVAILABLE, f"server at {self._target} not ready after {self._timeout_s}s"
        )


class Outputs(enum.IntEnum):
    """Which timesteps' outputs a chunk's answer carries: every one, or only the chunk's last."""

    ALL = pb.OUTPUT_MODE_ALL
    LAST = pb.OUTPUT_MODE_LAST


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as GetModelInfo describes it (field meanings: conveyor.v1.ModelInfo)."""

    name: str
    task: str
    input_kind: str  # "tokens" | "features"
    input_size: int
    output_size: int
    output_meaning: str
    output_labels: tuple[str, ...]
    vocabulary: tuple[str, ...]
    fingerprint: str
    layers: int
    hidden: int
    max_chunk_steps: int
    idle_ttl_s: float
    cell: str
    state: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape per session) of each state tensor
    constants: tuple[tuple[str, tuple[int | float, ...]], ...] = ()  # (name, values) fed on every run
    window: int = 0  # a framed model: samples per window (a step is a sample); 0 otherwise
    context: int = 0
    version: int = 1  # the version described, and its state ("ready", "draining")
    version_state: str = "ready"

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> ModelInfo:
        """Copy a ModelInfo message into this immutable form (repeated fields become tuples)."""
        values = {field.name: getattr(message, field.name) for field in fields(cls)}
        for name in ("output_labels", "vocabulary"):
            values[name] = tuple(values[name])
        values["state"] = tuple((tensor.name, tuple(tensor.shape)) for tensor in message.state)
        values["constants"] = tuple(
            (constant.name, tuple(decode(constant.value).ravel().tolist())) for constant in message.constants
        )
        return cls(**values)

    @property
    def takes_tokens(self) -> bool:
        """True for token models (int64 ids in), False for feature models (float32 vectors in)."""
        return self.input_kind == "tokens"


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model a server holds, as ListModels describes it (ModelVersionStatus)."""

    model: str
    version: int
    state: str  # "loading", "ready", "draining", "retired" or "failed"
    fingerprint: str
    labels: tuple[str, ...]
    sessions: int
    message: str  # why a failed version did not load

    @classmethod
    def from_proto(cls, message: pb.ModelVersionStatus) -> ModelVersion:
        """Copy a ModelVersionStatus message into this immutable form."""
        values = {field.name: getattr(message, field.name) for field in fields(cls)}
        return cls(**{**values, "labels": tuple(message.labels)})


@dataclass(frozen=True)
class Snapshot:
    """A session's exported state: an opaque blob and the timesteps consumed when it was taken."""

    blob: bytes
    steps: int


def call_metadata(options: ClientOptions, route_key: str) -> tuple[tuple[str, str], ...]:
    """A call's metadata: the bearer token (when the options hold one) and the routing key (none for an
    empty key: the proxy picks)."""
    token = (("authorization", f"Bearer {options.token}"),) if options.token else ()
    return token + (((ROUTE_HEADER, route_key),) if route_key else ())


def retry_delay(error: grpc.RpcError | ConveyorError, backoffs: Iterator[float]) -> float:
    """Seconds to wait before retrying after `error`; raises it as a ConveyorError when it is final."""
    failure = ConveyorError.from_exception(error)
    delay = next(backoffs, None) if failure.retryable else None
    if delay is None:
        raise failure from None
    return delay
