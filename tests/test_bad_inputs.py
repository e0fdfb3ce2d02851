"""The bad-input table (docs/protocol.md): each class of client mistake, sent to a real server over a real
channel, gets its status code and a message that says what was wrong; the session it names is left exactly as
it was (its snapshot is the same, byte for byte), and the server stays SERVING."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from serving_harness import assert_error, card, health_status, running, sequence

from serving.domain.sessions.snapshots import SnapshotCodec
from serving.server.app import RunningServer
from serving.wire import pb, pb_grpc
from serving.wire.tensors import encode

pytestmark = pytest.mark.timeout(60)

Code = grpc.StatusCode
ANCHOR = "anchor"  # a live session at 3 steps, which no bad request may change


class Case(NamedTuple):
    """One class of bad input: the RPC, the request (given the anchor's inputs), the code and message."""

    rpc: str
    request: Callable[[np.ndarray, dict[str, Any]], Any]
    code: grpc.StatusCode
    message: str  # a regular expression the details must match


def _chunk(x: np.ndarray, **fields: Any) -> pb.ChunkRequest:
    fields.setdefault("session_id", ANCHOR)
    fields.setdefault("offset", 3)
    return pb.ChunkRequest(inputs=fields.pop("inputs", encode(x[:2])), **fields)


def _tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DType.ValueType(dtype), shape=shape, data=data)


def _other_models_snapshot(model: dict[str, Any]) -> bytes:
    size = 2 * model["layers"] * model["hidden"]
    return SnapshotCodec("cd" * 32, size).encode(np.zeros(size, np.float32), 3)


CASES: dict[str, Case] = {
    "unknown session without start": Case(
        "Step",
        lambda x, m: _chunk(x, session_id="ghost", offset=0),
        Code.NOT_FOUND,
        "'ghost' expired or never",
    ),
    "start on a live session": Case(
        "Step", lambda x, m: _chunk(x, offset=0, start=True), Code.ALREADY_EXISTS, "already live at 3 steps"
    ),
    "offset behind the session": Case(
        "Step", lambda x, m: _chunk(x, offset=1), Code.ABORTED, "consumed 3 steps .* resend from offset 3"
    ),
    "offset ahead of the session": Case(
        "Step", lambda x, m: _chunk(x, offset=9), Code.ABORTED, "consumed 3 steps but the chunk's offset is 9"
    ),
    "negative offset": Case(
        "Step", lambda x, m: _chunk(x, offset=-1), Code.INVALID_ARGUMENT, "offset must be >= 0"
    ),
    "empty session id without start": Case(
        "Step", lambda x, m: _chunk(x, session_id=""), Code.INVALID_ARGUMENT, "session_id is empty"
    ),
    "session id too long": Case(
        "Step", lambda x, m: _chunk(x, session_id="s" * 129), Code.INVALID_ARGUMENT, "use 1-128 characters"
    ),
    "session id with other characters": Case(
        "Step", lambda x, m: _chunk(x, session_id="a/b c"), Code.INVALID_ARGUMENT, "'a/b c' is invalid"
    ),
    "reset without start": Case(
        "Step",
        lambda x, m: _chunk(x, reset=True),
        Code.INVALID_ARGUMENT,
        "reset and snapshot only apply with start",
    ),
    "snapshot without start": Case(
        "Step", lambda x, m: _chunk(x, snapshot=b"x"), Code.INVALID_ARGUMENT, "reset and snapshot only apply"
    ),
    "float inputs for a token model": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(x[:2].astype(np.float32))),
        Code.INVALID_ARGUMENT,
        r"inputs must be INT64 token ids of shape \[time\], got float32",
    ),
    "a matrix for a token model": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(x[:2, None])),
        Code.INVALID_ARGUMENT,
        r"got int64 \[2, 1\]",
    ),
    "token id outside the vocabulary": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(np.array([m["input"]["size"]]))),
        Code.INVALID_ARGUMENT,
        "is outside the vocabulary",
    ),
    "negative token id": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(np.array([-4]))),
        Code.INVALID_ARGUMENT,
        "token id -4 is outside",
    ),
    "empty chunk": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(x[:0])),
        Code.INVALID_ARGUMENT,
        "1 to 1024 timesteps, got 0",
    ),
    "chunk longer than max_chunk_steps": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=encode(np.zeros(1025, np.int64))),
        Code.INVALID_ARGUMENT,
        "1 to 1024 timesteps, got 1025",
    ),
    "data size not the shape's": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=_tensor(pb.DTYPE_INT64, [3], bytes(8))),
        Code.INVALID_ARGUMENT,
        r"tensor data has 8 bytes but shape \[3\]",
    ),
    "negative dimension": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=_tensor(pb.DTYPE_INT64, [-1], b"")),
        Code.INVALID_ARGUMENT,
        "has a negative dimension",
    ),
    "dtype number the proto does not define": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=_tensor(77, [1], bytes(8))),
        Code.INVALID_ARGUMENT,
        "unsupported tensor dtype 77",
    ),
    "dtype left unspecified": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=_tensor(0, [1], bytes(8))),
        Code.INVALID_ARGUMENT,
        "unsupported tensor dtype DTYPE_UNSPECIFIED",
    ),
    "a dimension no array can hold": Case(
        "Step",
        lambda x, m: _chunk(x, inputs=_tensor(pb.DTYPE_INT64, [0, 2**61], b"")),
        Code.INVALID_ARGUMENT,
        "cannot be held in memory",
    ),
    "outputs mode the proto does not define": Case(
        "Step", lambda x, m: _chunk(x, outputs=9), Code.INVALID_ARGUMENT, "unknown outputs mode 9"
    ),
    "a snapshot that is not one": Case(
        "Step",
        lambda x, m: _chunk(x, session_id="restored", offset=0, start=True, snapshot=b"junk"),
        Code.INVALID_ARGUMENT,
        "not a Conveyor snapshot",
    ),
    "a truncated snapshot": Case(
        "Step",
        lambda x, m: _chunk(
            x, session_id="restored", offset=3, start=True, snapshot=_other_models_snapshot(m)[:-3]
        ),
        Code.INVALID_ARGUMENT,
        "truncated or corrupt",
    ),
    "a snapshot of another model": Case(
        "Step",
        lambda x, m: _chunk(
            x, session_id="restored", offset=3, start=True, snapshot=_other_models_snapshot(m)
        ),
        Code.FAILED_PRECONDITION,
        "taken on model cdcdcdcdcdcd but this server runs",
    ),
    "bytes that are no ChunkRequest": Case(
        "Step",
        lambda x, m: b"\xff\xff\xff",
        Code.INVALID_ARGUMENT,
        "not a valid conveyor.v1.ChunkRequest message",
    ),
    "ending an unknown session": Case(
        "EndSession",
        lambda x, m: pb.EndSessionRequest(session_id="ghost"),
        Code.NOT_FOUND,
        "expired or never",
    ),
    "snapshot of an unknown session": Case(
        "Snapshot", lambda x, m: pb.SnapshotRequest(session_id="ghost"), Code.NOT_FOUND, "expired or never"
    ),
    "a message over the size limit": Case(
        "Step",
        lambda x, m: bytes(6 << 20),
        Code.RESOURCE_EXHAUSTED,
        r"larger than max \(6291456 vs. 4194304\)",
    ),
}


@pytest.fixture(scope="module")
def server(token_artifact: Path) -> Iterator[tuple[RunningServer, grpc.Channel, bytes]]:
    """A server with the anchor session at 3 steps; yields it, a channel and the anchor's snapshot."""
    with (
        running(token_artifact) as running_server,
        grpc.insecure_channel(f"127.0.0.1:{running_server.port}") as ch,
    ):
        stub = pb_grpc.ConveyorStub(ch)
        x = sequence(token_artifact, 6)
        stub.Step(pb.ChunkRequest(session_id=ANCHOR, inputs=encode(x[:3]), start=True), timeout=10)
        yield running_server, ch, stub.Snapshot(pb.SnapshotRequest(session_id=ANCHOR), timeout=10).snapshot


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_gets_its_code_and_message_and_changes_nothing(
    name: str, server: tuple[RunningServer, grpc.Channel, bytes], token_artifact: Path
) -> None:
    running_server, channel, anchor_snapshot = server
    case = CASES[name]
    request = case.request(sequence(token_artifact, 6), card(token_artifact))
    serialize = (
        (lambda raw: raw) if isinstance(request, bytes) else (lambda message: message.SerializeToString())
    )
    call = channel.unary_unary(f"/conveyor.v1.Conveyor/{case.rpc}", request_serializer=serialize)
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=10)
    assert_error(refused.value, case.code, case.message)
    stub = pb_grpc.ConveyorStub(channel)
    assert stub.Snapshot(pb.SnapshotRequest(session_id=ANCHOR), timeout=10).snapshot == anchor_snapshot
    assert health_status(running_server) == health_pb2.HealthCheckResponse.SERVING


def test_the_table_has_at_least_25_classes() -> None:
    assert len(CASES) >= 25
