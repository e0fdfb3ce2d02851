"""Protobuf <-> domain, and domain errors -> gRPC status codes: the one table of codes, for every RPC.

Deadlines: grpcio cancels a handler whose deadline passes; the engine commits a chunk's state only after its
run, so a cancelled chunk leaves its session as it was and a retry with the same offset is exactly-once.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from serving.domain.chunks import Chunk, ChunkResult, OutputMode, ServedModel
from serving.domain.errors import (
    CapacityExceededError,
    InvalidChunkError,
    InvalidSessionIdError,
    InvalidSnapshotError,
    ModelNotNamedError,
    ModelNotServedError,
    OffsetMismatchError,
    QuotaExceededError,
    ReplayNotKeptError,
    ServingError,
    SessionAlreadyExistsError,
    SessionMovedError,
    SessionNotFoundError,
    SessionNotServedError,
    SessionPinnedError,
    ShuttingDownError,
    SnapshotModelMismatchError,
    StoreUnavailableError,
    UnauthenticatedError,
    VersionRetiredError,
    VersionUnavailableError,
)
from serving.domain.frames import Frame, FrameOutcome
from serving.domain.models import Models
from serving.domain.sessions.store import EndReason, SessionEnd
from serving.server.malformed import Malformed
from serving.wire import pb
from serving.wire.tensors import TensorDecodeError, decode, encode

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidChunkError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSessionIdError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSnapshotError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotServedError: grpc.StatusCode.NOT_FOUND,
    ModelNotNamedError: grpc.StatusCode.INVALID_ARGUMENT,
    VersionRetiredError: grpc.StatusCode.NOT_FOUND,
    VersionUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    SessionPinnedError: grpc.StatusCode.FAILED_PRECONDITION,
    SessionNotServedError: grpc.StatusCode.NOT_FOUND,
    SessionNotFoundError: grpc.StatusCode.NOT_FOUND,
    SessionAlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    OffsetMismatchError: grpc.StatusCode.ABORTED,
    ReplayNotKeptError: grpc.StatusCode.ABORTED,
    SessionMovedError: grpc.StatusCode.ABORTED,
    SnapshotModelMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,
}
BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_REASONS = {
    EndReason.END: pb.END_REASON_END,
    EndReason.TTL: pb.END_REASON_TTL,
    EndReason.LIFETIME: pb.END_REASON_LIFETIME,
    EndReason.CAPACITY: pb.END_REASON_CAPACITY,
    EndReason.SHUTDOWN: pb.END_REASON_SHUTDOWN,
    EndReason.MODEL_RETIRED: pb.END_REASON_MODEL_RETIRED,
}
# gRPC's default receive limit: what a client that names none can take.
DEFAULT_RESULT_LIMIT_BYTES = 4 * 1024 * 1024
# A session's columns besides its outputs: its id's tag and length, its step count (a varint of at most 10
# bytes) and two flags, each with room for its packed field's share.
_ROW_BYTES = 24
_OUTPUT_MODES = {pb.OUTPUT_MODE_ALL: OutputMode.ALL, pb.OUTPUT_MODE_LAST: OutputMode.LAST}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`; unexpected errors become a logged INTERNAL."""
    code = STATUS_CODES.get(type(error)) if isinstance(error, ServingError) else None
    if code is None:
        logger.error("unexpected error while handling a request", exc_info=error)
        return grpc.StatusCode.INTERNAL, "internal server error (logged on the server)"
    return code, str(error)


def chunk_from_pb(request: pb.ChunkRequest, namespace: str = "") -> Chunk:
    """The domain chunk of a request; `InvalidChunkError` when its tensor or output mode does not parse."""
    try:
        inputs = decode(request.inputs)
    except TensorDecodeError as exc:
        raise InvalidChunkError(f"inputs: {exc}") from exc
    mode = _OUTPUT_MODES.get(request.outputs)
    if mode is None:
        raise InvalidChunkError(f"unknown outputs mode {request.outputs}")
    return Chunk(
        session_id=request.session_id,
        inputs=inputs,
        offset=request.offset,
        start=request.start,
        end=request.end,
        reset=request.reset,
        snapshot=request.snapshot,
        outputs=mode,
        namespace=namespace,
    )


def result_to_pb(
    result: ChunkResult, request_id: str, response: pb.ChunkResponse | None = None
) -> pb.ChunkResponse:
    """The response message of a chunk's result, written into `response` when given (e.g. a StreamResponse's
    `chunk`): a nested message assigned whole would be copied, and this runs for every chunk."""
    response = pb.ChunkResponse() if response is None else response
    response.session_id = result.session_id
    response.request_id = request_id
    response.offset = result.offset
    response.steps = result.steps
    response.ended = result.ended
    response.replayed = result.replayed
    # The engine's outputs are always float32: the fields go straight in, without building a Tensor to copy.
    outputs = response.outputs
    outputs.dtype = pb.DTYPE_FLOAT32
    outputs.shape[:] = result.outputs.shape
    outputs.data = result.outputs.astype("<f4", copy=False).tobytes()
    return response


def versions_to_pb(models: Models) -> pb.ListModelsResponse:
    """The ListModels answer: every version the server holds, with its state."""
    return pb.ListModelsResponse(
        versions=[
            pb.ModelVersionStatus(
                model=version.name,
                version=version.number,
                state=version.state.value,
                fingerprint=version.fingerprint,
                labels=models.labels_of(version),
                sessions=version.served.live_sessions if version.live else 0,
                message=version.message,
            )
            for version in models.versions()
        ]
    )


def model_info_to_pb(model: ServedModel, version: int = 1, state: str = "ready") -> pb.ModelInfo:
    """The GetModelInfo answer for `model`, served as `version` in `state`."""
    spec = model.spec
    return pb.ModelInfo(
        version=version,
        version_state=state,
        name=spec.name,
        task=spec.task,
        input_kind=spec.input_kind,
        input_size=spec.input_size,
        output_size=spec.output_size,
        output_meaning=spec.output_meaning,
        output_labels=spec.output_labels,
        vocabulary=spec.vocabulary,
        fingerprint=spec.fingerprint,
        layers=spec.layers,
        hidden=spec.hidden,
        max_chunk_steps=model.max_chunk_steps,
        idle_ttl_s=model.idle_ttl_s,
        cell=spec.cell,
        state=[pb.StateTensorInfo(name=tensor.name, shape=tensor.row_shape) for tensor in spec.states],
        constants=[pb.ConstantInfo(name=c.name, value=encode(c.array())) for c in spec.constants],
        window=spec.framing.window if spec.framing else 0,
        context=spec.framing.context if spec.framing else 0,
    )


def error_to_pb(error: Exception, request_id: str = "", session_id: str = "") -> pb.ChunkError:
    """The in-band error message of a chunk, frame or unreadable message that failed with `error`."""
    code, message = status_for(error)
    return pb.ChunkError(session_id=session_id, request_id=request_id, code=code.value[0], message=message)


def malformed(request: Malformed) -> InvalidChunkError:
    """The error of a Stream or Frames message that does not parse (no request id to match: none could be
    read)."""
    return InvalidChunkError(request.describe())


def end_notice(ended: SessionEnd) -> pb.StreamResponse:
    """The in-band message telling a Stream that one of its sessions has ended."""
    return pb.StreamResponse(session_ended=_session_ended(ended))


def frame_end_notice(ended: SessionEnd) -> pb.FrameResponse:
    """The in-band message telling a Frames stream that one of its sessions has ended."""
    return pb.FrameResponse(session_ended=_session_ended(ended))


def _session_ended(ended: SessionEnd) -> pb.SessionEnded:
    return pb.SessionEnded(session_id=ended.session_id, reason=_REASONS[ended.reason], steps=ended.steps)


def frame_from_pb(frame: pb.Frame, namespace: str = "") -> Frame:
    """A frame as columns; `InvalidChunkError` when the frame as a whole does not parse: its tensor, or
    columns that disagree."""
    sessions = len(frame.session_ids)
    if not sessions:
        raise InvalidChunkError("the frame carries no session")
    try:
        inputs = decode(frame.inputs)
    except TensorDecodeError as exc:
        raise InvalidChunkError(f"inputs: {exc}") from exc
    if inputs.ndim < 2 or inputs.shape[0] != sessions:
        raise InvalidChunkError(
            f"inputs {list(inputs.shape)} must be [sessions ({sessions}), time] or [sessions, time, features]"
        )
    defaults = {"offsets": 0, "start": False, "end": False, "reset": False, "snapshots": b""}
    columns: dict[str, list[Any]] = {}
    for name, default in defaults.items():
        column = list(getattr(frame, name))
        if len(column) not in (0, sessions):
            raise InvalidChunkError(f"{name} has {len(column)} entries for {sessions} sessions")
        columns[name] = column or [default] * sessions
    mode = _OUTPUT_MODES.get(frame.outputs)
    if mode is None:
        raise InvalidChunkError(f"unknown outputs mode {frame.outputs}")
    offsets, start, end, reset, snapshots = columns.values()
    return Frame(list(frame.session_ids), inputs, offsets, start, end, reset, snapshots, mode, namespace)


def result_limit(frame: pb.Frame) -> int:
    """The largest FrameResponse the frame's client accepts; `InvalidChunkError` for a negative limit."""
    if frame.max_result_bytes < 0:
        raise InvalidChunkError(
            f"max_result_bytes must be >= 0 (0: {DEFAULT_RESULT_LIMIT_BYTES}), got {frame.max_result_bytes}"
        )
    return frame.max_result_bytes or DEFAULT_RESULT_LIMIT_BYTES


def check_result_fits(frame: pb.Frame, limit: int, output_size: int) -> None:
    """`InvalidChunkError` when one session's result alone would pass `limit`: no split could deliver it."""
    steps = 1 if frame.outputs == pb.OUTPUT_MODE_LAST else (frame.inputs.shape[1:2] or [1])[0]
    needed = 4 * output_size * max(steps, 1) + _ROW_BYTES + _part_headroom(frame.frame_id)
    if needed > limit:
        raise InvalidChunkError(
            f"one session's result needs {needed} bytes ({steps} steps x {output_size} float32 outputs), "
            f"over the frame's max_result_bytes {limit}: raise the client's receive limit "
            "(grpc.max_receive_message_length) and max_result_bytes, send shorter chunks, or ask for "
            "OUTPUT_MODE_LAST"
        )


def frame_results_to_pb(frame_id: str, outcome: FrameOutcome, limit: int) -> list[pb.FrameResult]:
    """The FrameResults of a frame's outcome (each session's result, or the error of that session alone): one
    message when it fits in `limit` bytes, else parts of consecutive sessions, each under it."""
    errors = [
        pb.FrameError(index=index, code=code.value[0], message=message)
        for index, (code, message) in ((i, status_for(e)) for i, e in sorted(outcome.errors.items()))
    ]
    sessions = len(outcome.session_ids)
    row_bytes = outcome.outputs[0].nbytes + max(map(len, outcome.session_ids)) + _ROW_BYTES
    room = limit - _part_headroom(frame_id) - sum(error.ByteSize() + 4 for error in errors)
    rows = sessions if row_bytes * sessions <= room else max(1, room // row_bytes)
    parts = [_part(frame_id, outcome, errors, first, first + rows) for first in range(0, sessions, rows)]
    parts[-1].more = False
    return parts


def _part(
    frame_id: str, outcome: FrameOutcome, errors: list[pb.FrameError], first: int, last: int
) -> pb.FrameResult:
    """Sessions `first` to `last` (exclusive) of the outcome, with their errors (indexed in the frame)."""
    whole = first == 0 and last >= len(outcome.session_ids)
    result = pb.FrameResult(
        frame_id=frame_id,
        session_ids=outcome.session_ids if whole else outcome.session_ids[first:last],
        steps=outcome.steps if whole else outcome.steps[first:last],
        ended=outcome.ended if whole else outcome.ended[first:last],
        replayed=outcome.replayed if whole else outcome.replayed[first:last],
        errors=errors if whole else [error for error in errors if first <= error.index < last],
        first_index=first,
        more=True,
    )
    if outcome.output_steps is not None:
        result.output_steps[:] = outcome.output_steps[first:last].tolist()
    outputs = outcome.outputs[first:last]
    result.outputs.dtype = pb.DTYPE_FLOAT32
    result.outputs.shape[:] = outputs.shape
    result.outputs.data = outputs.astype("<f4", copy=False).tobytes()
    return result


def _part_headroom(frame_id: str) -> int:
    """Bytes of a FrameResponse besides its sessions' rows and errors: the id, the outputs' shape and dtype,
    the part's index and flags, the fields' tags and lengths (a generous bound)."""
    return len(frame_id) + 256
