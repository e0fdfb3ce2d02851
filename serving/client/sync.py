"""The Conveyor Python client: sessions that hide offsets and retries, over the conveyor.v1 gRPC API.

This module is the synchronous client, which sends each chunk as one unary Step call. The asyncio client,
which multiplexes many sessions over one bidirectional Stream, is `serving.client.aio.AsyncConveyorClient`.

    with ConveyorClient("localhost:50051") as client:
        client.wait_for_ready(timeout_s=10)
        with client.session() as session:
            logits = session.send(np.array([3, 14, 15]))  # (3, outputs) float32

Retries: a chunk that fails with UNAVAILABLE or DEADLINE_EXCEEDED is resent with the same offset. The server
applies a chunk once per offset and answers a repeat of the last chunk from its cache, so a retry after a lost
response is exactly-once. One case cannot be made exactly-once: a first chunk asking for a server-issued id,
whose response is lost, opens a second session; the first one then expires with the server's idle TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

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
from serving.wire import pb, pb_grpc

T = TypeVar("T")


class ConveyorClient:
    """A synchronous client for one Conveyor server (one channel); sessions send each chunk as a Step call."""

    def __init__(self, target: str, options: ClientOptions = DEFAULT_OPTIONS) -> None:
        self.target = target
        self.options = options
        self._channel: grpc.Channel = options.open_channel(grpc, target)
        self._stub = pb_grpc.ConveyorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; sessions stay alive on the server until ended or expired."""
        self._channel.close()

    def wait_for_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the server's health service says SERVING; ConveyorError(UNAVAILABLE) on timeout."""
        check, health = ReadinessCheck(self.target, self.options, timeout_s), self._health
        while (remaining_s := check.remaining_s()) > 0:
            try:
                answer = health.Check(check.request, timeout=remaining_s, wait_for_ready=True)
            except grpc.RpcError as exc:
                answer = exc
            if check.ready(answer):
                return
            time.sleep(check.pause_s())
        raise check.timed_out()

    def model_info(self) -> ModelInfo:
        """Describe the served model."""
        return ModelInfo.from_proto(self._call(self._stub.GetModelInfo, pb.ModelInfoRequest()))

    def models(self) -> list[ModelVersion]:
        """Every model version the server holds, with its state."""
        listed: pb.ListModelsResponse = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelVersion.from_proto(version) for version in listed.versions]

    def session(
        self, session_id: str | None = None, *, outputs: Outputs = Outputs.ALL, reset: bool = False
    ) -> Session:
        """A new session, started by its first send (server-issued id when session_id is None)."""
        return Session(self, SessionCursor(session_id, outputs, reset=reset))

    def attach(self, session_id: str, offset: int, *, outputs: Outputs = Outputs.ALL) -> Session:
        """A live session started elsewhere (another call, connection or process), going on at `offset`."""
        return Session(self, SessionCursor(session_id, outputs, offset=offset, started=True))

    def restore(
        self, snapshot: Snapshot, session_id: str | None = None, *, outputs: Outputs = Outputs.ALL
    ) -> Session:
        """A session that resumes from `snapshot` with its first send (on this or any same-model server)."""
        return Session(
            self, SessionCursor(session_id, outputs, offset=snapshot.steps, snapshot=snapshot.blob)
        )

    def step(self, request: pb.ChunkRequest) -> pb.ChunkResponse:
        """Send one raw chunk request as a unary Step call, retrying retryable failures."""
        response: pb.ChunkResponse = self._call(self._stub.Step, request)
        return response

    def end_session(self, session_id: str) -> int:
        """End a session and free its state; returns the timesteps it had consumed."""
        reply: pb.EndSessionResponse = self._call(
            self._stub.EndSession, pb.EndSessionRequest(session_id=session_id)
        )
        return reply.steps

    def snapshot(self, session_id: str) -> Snapshot:
        """Export a live session's state."""
        reply = self._call(self._stub.Snapshot, pb.SnapshotRequest(session_id=session_id))
        return Snapshot(reply.snapshot, reply.steps)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        backoffs = self.options.retry.backoffs()
        self.options.address(request)
        while True:
            try:
                metadata = call_metadata(self.options, getattr(request, "session_id", ""))
                return method(request, timeout=self.options.timeout_s, metadata=metadata)
            except grpc.RpcError as exc:
                delay = retry_delay(exc, backoffs)
            time.sleep(delay)


class Session(SessionHandle):
    """One sequence streamed in chunks over a ConveyorClient; tracks the offset, ends on leaving `with`."""

    def __init__(self, client: ConveyorClient, cursor: SessionCursor) -> None:
        super().__init__(cursor)
        self._client = client

    def send(self, chunk: np.ndarray | list[Any], *, end: bool = False) -> np.ndarray:
        """Apply the next chunk; returns its outputs, (time, outputs) or (1, outputs) float32, read-only.

        `chunk` is (time,) token ids or (time, features) floats. `end=True` frees the session with this chunk.
        """
        return self.cursor.accept(self._client.step(self.cursor.request(chunk, end)))

    def snapshot(self) -> Snapshot:
        """Export the session's state, to restore later with ConveyorClient.restore."""
        return self._client.snapshot(self.cursor.require_started())

    def end(self) -> None:
        """Free the session's state on the server (no-op when it never started or already ended)."""
        session_id = self.cursor.close()
        if session_id:
            try:
                self._client.end_session(session_id)
            except ConveyorError as exc:
                not_found_is_ended(exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
