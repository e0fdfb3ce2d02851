"""The session contract, one rule per test, against a real server: status code, message, and state unchanged
(checked by then sending the correct next chunk and comparing with the offline run)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import (
    assert_close,
    assert_continues,
    assert_error,
    chunk,
    connect,
    offline,
    outputs,
    rejected,
    running,
    sequence,
    start_session,
)

from serving.domain.errors import InvalidChunkError, OffsetMismatchError, ServingError, ShuttingDownError
from serving.server.translate import STATUS_CODES, status_for
from serving.wire import pb, pb_grpc

pytestmark = pytest.mark.timeout(60)
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def token_stub(token_artifact: Path) -> Iterator[pb_grpc.ConveyorStub]:
    """A stub on one default-configured token server shared by this module."""
    with running(token_artifact) as server, connect(server) as stub:
        yield stub


@pytest.fixture(scope="module")
def feature_stub(feature_artifact: Path) -> Iterator[pb_grpc.ConveyorStub]:
    """A stub on one default-configured feature server shared by this module."""
    with running(feature_artifact) as server, connect(server) as stub:
        yield stub


def test_unknown_session_is_not_found(token_artifact: Path, token_stub: pb_grpc.ConveyorStub) -> None:
    error = rejected(token_stub.Step, chunk("never-started", sequence(token_artifact), 0))
    assert_error(error, Code.NOT_FOUND, "session 'never-started' expired or never started")


def test_start_on_a_live_session_is_already_exists(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    start_session(token_stub, "taken", x[:4])
    error = rejected(token_stub.Step, chunk("taken", x[4:8], 0, start=True))
    assert_error(error, Code.ALREADY_EXISTS, "'taken' is already live at 4 steps")
    assert_continues(token_stub, token_artifact, "taken", x, 4)


def test_reset_restarts_ones_own_session(token_artifact: Path, token_stub: pb_grpc.ConveyorStub) -> None:
    first, second = sequence(token_artifact, seed=1), sequence(token_artifact, seed=2)
    start_session(token_stub, "restart-me", first[:5])
    response = token_stub.Step(chunk("restart-me", second[:3], 0, start=True, reset=True), timeout=10)
    assert response.steps == 3
    assert_close(outputs(response), offline(token_artifact, second)[:3])
    assert_continues(token_stub, token_artifact, "restart-me", second, 3)


def test_offset_mismatch_is_aborted_with_the_server_count(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    start_session(token_stub, "counted", x[:6])
    for wrong in (4, 7):
        error = rejected(token_stub.Step, chunk("counted", x[6:], wrong))
        assert_error(error, Code.ABORTED, f"has consumed 6 steps but the chunk's offset is {wrong}")
    assert_continues(token_stub, token_artifact, "counted", x, 6)


def test_a_repeated_chunk_returns_the_cached_response_without_applying_it_twice(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    first = start_session(token_stub, "retried", x[:5])
    assert start_session(token_stub, "retried", x[:5]).replayed  # a retried start, too, is answered once
    applied = token_stub.Step(chunk("retried", x[5:9], 5), timeout=10)
    again = token_stub.Step(chunk("retried", x[5:9], 5), timeout=10)
    assert (applied.replayed, again.replayed, again.steps, again.offset) == (False, True, 9, 5)
    assert again.outputs == applied.outputs and not first.replayed
    assert_continues(token_stub, token_artifact, "retried", x, 9)


def test_a_retried_last_chunk_is_answered_again_after_its_session_ended(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    start_session(token_stub, "ending", x[:5])
    last = token_stub.Step(chunk("ending", x[5:9], 5, end=True), timeout=10)
    again = token_stub.Step(chunk("ending", x[5:9], 5, end=True), timeout=10)  # its response was lost
    assert (last.ended, last.replayed, again.ended, again.replayed, again.steps) == (
        True,
        False,
        True,
        True,
        9,
    )
    assert again.outputs == last.outputs
    # Only that chunk: anything else for the ended session is NOT_FOUND, and so is the EndSession call.
    for other in (chunk("ending", x[5:8], 5, end=True), chunk("ending", x[9:], 9)):
        assert_error(rejected(token_stub.Step, other), Code.NOT_FOUND, "'ending' expired or never started")
    assert_error(
        rejected(token_stub.EndSession, pb.EndSessionRequest(session_id="ending")), Code.NOT_FOUND, "'ending'"
    )


def _tensor(dtype: pb.DType.ValueType, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


_F32, _I64 = pb.DTYPE_FLOAT32, pb.DTYPE_INT64
_TOKEN_CASES = {
    "float tokens": (_tensor(_F32, [3], np.zeros(3, "<f4").tobytes()), "inputs must be INT64 token ids"),
    "2-d tokens": (
        _tensor(_I64, [3, 2], np.zeros(6, "<i8").tobytes()),
        r"of shape \[time\], got int64 \[3, 2\]",
    ),
    "out of vocabulary": (
        _tensor(_I64, [2], np.array([1, 10**6], "<i8").tobytes()),
        "outside the vocabulary",
    ),
    "negative id": (_tensor(_I64, [2], np.array([-1, 0], "<i8").tobytes()), "token id -1 is outside"),
    "too long": (_tensor(_I64, [1025], np.zeros(1025, "<i8").tobytes()), "1 to 1024 timesteps, got 1025"),
    "empty": (_tensor(_I64, [0], b""), "1 to 1024 timesteps, got 0"),
    "short data": (_tensor(_I64, [3], b"\0" * 5), "has 5 bytes but shape"),
    "no dtype": (pb.Tensor(), "unsupported tensor dtype"),
}


@pytest.mark.parametrize("case", sorted(_TOKEN_CASES))
def test_invalid_token_chunks_are_invalid_argument_and_change_nothing(
    case: str, token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    bad, message = _TOKEN_CASES[case]
    session_id = "bad-" + case.replace(" ", "-")
    x = sequence(token_artifact)
    start_session(token_stub, session_id, x[:3])
    error = rejected(token_stub.Step, pb.ChunkRequest(session_id=session_id, inputs=bad, offset=3))
    assert_error(error, Code.INVALID_ARGUMENT, message)
    assert_continues(token_stub, token_artifact, session_id, x, 3)


def _features(values: np.ndarray) -> pb.Tensor:
    return _tensor(_F32, list(values.shape), values.astype("<f4").tobytes())


_FEATURE_CASES = {
    "int features": (_tensor(_I64, [2, 6], np.zeros(12, "<i8").tobytes()), r"FLOAT32 of shape \[time, 6\]"),
    "wrong width": (_features(np.zeros((2, 7))), r"got float32 \[2, 7\]"),
    "nan": (_features(np.array([[0.0] * 6, [np.nan] + [0.0] * 5])), "NaN or infinite values .* timestep 1"),
    "inf": (_features(np.full((1, 6), np.inf)), "NaN or infinite"),
    "too long": (_features(np.zeros((1025, 6))), "1 to 1024 timesteps"),
}


@pytest.mark.parametrize("case", sorted(_FEATURE_CASES))
def test_invalid_feature_chunks_are_invalid_argument_and_change_nothing(
    case: str, feature_artifact: Path, feature_stub: pb_grpc.ConveyorStub
) -> None:
    bad, message = _FEATURE_CASES[case]
    session_id = "bad-" + case.replace(" ", "-")
    x = sequence(feature_artifact)
    start_session(feature_stub, session_id, x[:3])
    error = rejected(feature_stub.Step, pb.ChunkRequest(session_id=session_id, inputs=bad, offset=3))
    assert_error(error, Code.INVALID_ARGUMENT, message)
    assert_continues(feature_stub, feature_artifact, session_id, x, 3)


@pytest.mark.parametrize("session_id", ["has space", "x" * 129, "ünï", "semi;colon", "slash/"])
def test_bad_session_ids_are_invalid_argument(
    session_id: str, token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    error = rejected(token_stub.Step, chunk(session_id, sequence(token_artifact), 0, start=True))
    assert_error(error, Code.INVALID_ARGUMENT, "session id .* is invalid: use 1-128 characters")
    error = rejected(token_stub.EndSession, pb.EndSessionRequest(session_id=session_id))
    assert error.code() == Code.INVALID_ARGUMENT


def test_an_empty_session_id_without_start_is_invalid_argument(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    error = rejected(token_stub.Step, chunk("", sequence(token_artifact), 0))
    assert_error(error, Code.INVALID_ARGUMENT, "session_id is empty")


def test_the_server_issues_ids_when_a_start_has_none(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    issued = [start_session(token_stub, "", x[:4]).session_id for _ in range(2)]
    assert issued[0] != issued[1] and all(re.fullmatch("[0-9a-f]{32}", sid) for sid in issued)
    assert_continues(token_stub, token_artifact, issued[0], x, 4)


def test_outputs_last_is_the_last_row_of_all(
    feature_artifact: Path, feature_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(feature_artifact)
    every = feature_stub.Step(chunk("all-rows", x, 0, start=True), timeout=10)
    last = feature_stub.Step(chunk("last-row", x, 0, start=True, outputs=pb.OUTPUT_MODE_LAST), timeout=10)
    assert list(every.outputs.shape) == [len(x), 4] and list(last.outputs.shape) == [1, 4]
    assert_close(outputs(last), outputs(every)[-1:])


def test_snapshot_and_restore_round_trip(token_artifact: Path, token_stub: pb_grpc.ConveyorStub) -> None:
    x = sequence(token_artifact)
    start_session(token_stub, "original", x[:7])
    taken = token_stub.Snapshot(pb.SnapshotRequest(session_id="original"), timeout=10)
    assert taken.steps == 7
    restore = chunk("restored", x[7:], 7, start=True, snapshot=taken.snapshot)
    assert_close(outputs(token_stub.Step(restore, timeout=10)), offline(token_artifact, x)[7:])
    assert_continues(token_stub, token_artifact, "original", x, 7)
    wrong_offset = rejected(
        token_stub.Step, chunk("restored-2", x[7:], 0, start=True, snapshot=taken.snapshot)
    )
    assert_error(wrong_offset, Code.ABORTED, "has consumed 7 steps")
    garbage = rejected(token_stub.Step, chunk("restored-3", x, 0, start=True, snapshot=b"not a snapshot"))
    assert_error(garbage, Code.INVALID_ARGUMENT, "not a Conveyor snapshot")


def test_restoring_onto_another_model_is_failed_precondition(
    token_artifact: Path,
    feature_artifact: Path,
    token_stub: pb_grpc.ConveyorStub,
    feature_stub: pb_grpc.ConveyorStub,
) -> None:
    start_session(token_stub, "elsewhere", sequence(token_artifact)[:3])
    blob = token_stub.Snapshot(pb.SnapshotRequest(session_id="elsewhere"), timeout=10).snapshot
    restore = chunk("moved", sequence(feature_artifact)[:2], 3, start=True, snapshot=blob)
    assert_error(
        rejected(feature_stub.Step, restore), Code.FAILED_PRECONDITION, "taken on model .* but this server"
    )


def test_every_domain_error_has_one_status_code_and_the_unexpected_are_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert status_for(OffsetMismatchError("s", 1, 2)) == (Code.ABORTED, str(OffsetMismatchError("s", 1, 2)))
    assert status_for(InvalidChunkError("bad")) == (Code.INVALID_ARGUMENT, "bad")
    assert status_for(ShuttingDownError())[0] == Code.UNAVAILABLE
    assert all(issubclass(kind, ServingError) for kind in STATUS_CODES)
    with caplog.at_level(logging.ERROR, logger="serving.server.translate"):
        code, message = status_for(KeyError("secret internals"))
    assert code == Code.INTERNAL and "secret" not in message
    assert "secret internals" in caplog.text and caplog.records[0].exc_info is not None
