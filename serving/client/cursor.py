"""A session's bookkeeping on the client side, shared by the sync and asyncio sessions: id, offset, lifecycle,
and the requests that carry its chunks."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from serving.client.core import ConveyorError, Outputs
from serving.wire import pb
from serving.wire.tensors import TensorDecodeError, decode, encode


def encode_chunk(chunk: np.ndarray | list[Any]) -> pb.Tensor:
    """A chunk as a wire Tensor: integer arrays go as int64 token ids, float arrays as float32 features."""
    array = np.asarray(chunk)
    if array.dtype.kind in "iu":
        return encode(array.astype(np.int64, copy=False))
    if array.dtype.kind == "f":
        return encode(array.astype(np.float32, copy=False))
    raise ConveyorError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"chunk dtype {array.dtype} is neither integer ids nor float features",
    )


class SessionCursor:
    """One session's bookkeeping, shared by the sync and asyncio sessions: its id, offset and lifecycle.

    The first request starts the session (from zeros, or from a snapshot); each accepted response moves the
    offset to the server's step count, so a retried request keeps the offset it was built with.
    """

    # __weakref__: the asyncio client routes end notices to live cursors through a WeakValueDictionary.
    __slots__ = (
        "__weakref__",
        "end_reason",
        "ended",
        "model_version",
        "offset",
        "outputs",
        "reset",
        "session_id",
        "snapshot",
        "started",
    )

    def __init__(
        self,
        session_id: str | None,
        outputs: Outputs,
        *,
        offset: int = 0,
        started: bool = False,
        reset: bool = False,
        snapshot: bytes = b"",
    ) -> None:
        self.session_id = session_id
        self.outputs = outputs
        self.offset = offset
        self.started = started
        self.reset = reset
        self.snapshot = snapshot
        self.ended = False
        self.model_version = ""  # the version the server began it on, named by every later chunk
        self.end_reason: str | None = None  # set from the Stream's SessionEnded notices (asyncio client)

    def request(self, chunk: np.ndarray | list[Any], end: bool) -> pb.ChunkRequest:
        """The request that sends `chunk` next (request_id left for the transport to fill in)."""
        if self.ended:
            raise ConveyorError(grpc.StatusCode.FAILED_PRECONDITION, f"session {self.session_id} has ended")
        return pb.ChunkRequest(
            session_id=self.session_id or "",
            inputs=encode_chunk(chunk),
            offset=self.offset,
            start=not self.started,
            end=end,
            reset=self.reset,
            snapshot=self.snapshot,
            outputs=pb.OutputMode.ValueType(self.outputs),
            model_version=self.model_version,
        )

    def accept(self, response: pb.ChunkResponse) -> np.ndarray:
        """Advance past an answered chunk and return its outputs (a read-only float32 view, no copy)."""
        self.session_id = response.session_id
        self.offset = response.steps
        self.started = True
        self.reset = False
        self.snapshot = b""
        self.ended = response.ended
        if response.model_version:
            self.model_version = str(response.model_version)
        try:
            return decode(response.outputs)
        except TensorDecodeError as exc:
            raise ConveyorError(
                grpc.StatusCode.INTERNAL, f"malformed outputs from the server: {exc}"
            ) from None

    def close(self) -> str | None:
        """Mark a live session ended and return its id to end on the server; None when none is live."""
        if not self.started or self.ended or not self.session_id:
            return None
        self.ended = True
        return self.session_id

    def require_started(self) -> str:
        """The session id, or FAILED_PRECONDITION when the session has not sent its first chunk yet."""
        if not self.started or self.session_id is None:
            raise ConveyorError(grpc.StatusCode.FAILED_PRECONDITION, "the session has not started yet")
        return self.session_id


class SessionHandle:
    """What the sync and asyncio sessions share: a cursor and read-only views of it."""

    def __init__(self, cursor: SessionCursor) -> None:
        self.cursor = cursor

    @property
    def session_id(self) -> str | None:
        """The session id (None until the server has issued one)."""
        return self.cursor.session_id

    @property
    def offset(self) -> int:
        """Timesteps the session has consumed: the next chunk's offset."""
        return self.cursor.offset


def not_found_is_ended(error: ConveyorError) -> None:
    """Ending a session that already expired or ended has done its job; any other failure is raised."""
    if error.code != grpc.StatusCode.NOT_FOUND:
        raise error
