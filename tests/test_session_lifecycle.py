"""Session lifecycle against a real server: capacity, eviction, expiry, the replay window, surviving a stream,
and the in-band notices a stream gets when one of its sessions ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fakes import FakeClock
from serving_harness import (
    RawStream,
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

from serving.server.app import RunningServer
from serving.wire import pb, pb_grpc

pytestmark = pytest.mark.timeout(60)
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def token_server(token_artifact: Path) -> Iterator[RunningServer]:
    """One default-configured token server shared by this module."""
    with running(token_artifact) as server:
        yield server


@pytest.fixture(scope="module")
def token_stub(token_server: RunningServer) -> Iterator[pb_grpc.ConveyorStub]:
    """A stub on the shared token server."""
    with connect(token_server) as stub:
        yield stub


def test_capacity_is_resource_exhausted(token_artifact: Path) -> None:
    x = sequence(token_artifact)
    with running(token_artifact, max_sessions=2) as server, connect(server) as stub:
        start_session(stub, "first", x[:4])
        start_session(stub, "second", x[:4])
        error = rejected(stub.Step, chunk("third", x[:4], 0, start=True))
        assert_error(error, Code.RESOURCE_EXHAUSTED, "capacity of 2 sessions")
        assert_continues(stub, token_artifact, "first", x, 4)
        stub.EndSession(pb.EndSessionRequest(session_id="second"), timeout=10)
        assert start_session(stub, "third", x[:4]).steps == 4


def test_capacity_can_evict_the_least_recently_used_session(token_artifact: Path) -> None:
    x = sequence(token_artifact)
    with (
        running(token_artifact, max_sessions=2, evict_lru_at_capacity=True) as server,
        connect(server) as stub,
    ):
        stream = RawStream(stub)
        stream.call(chunk("older", x[:4], 0, start=True))
        stream.call(chunk("newer", x[:4], 0, start=True))
        stream.call(chunk("older", x[4:6], 4))  # now "newer" is the least recently used
        assert start_session(stub, "newcomer", x[:4]).steps == 4
        notice = stream.receive().session_ended
        assert (notice.session_id, notice.reason, notice.steps) == ("newer", pb.END_REASON_CAPACITY, 4)
        assert rejected(stub.Step, chunk("newer", x[4:], 4)).code() == Code.NOT_FOUND
        assert_continues(stub, token_artifact, "older", x, 6)
        stream.close()


def test_a_session_survives_the_close_of_its_stream(
    token_artifact: Path, token_server: RunningServer
) -> None:
    x = sequence(token_artifact)
    with connect(token_server) as stub:
        first = RawStream(stub)
        first.call(chunk("survivor", x[:5], 0, start=True))
        assert first.close() == []
    with connect(token_server) as stub:  # a new connection, as after a client restart
        second = RawStream(stub)
        response = second.call(chunk("survivor", x[5:], 5)).chunk
        assert_close(outputs(response), offline(token_artifact, x)[5:])
        assert second.close() == []


def test_streams_are_told_in_band_when_their_session_is_ended(
    token_artifact: Path, token_stub: pb_grpc.ConveyorStub
) -> None:
    x = sequence(token_artifact)
    stream = RawStream(token_stub)
    stream.call(chunk("told", x[:5], 0, start=True))
    assert token_stub.EndSession(pb.EndSessionRequest(session_id="told"), timeout=10).steps == 5
    notice = stream.receive().session_ended
    assert (notice.session_id, notice.reason, notice.steps) == ("told", pb.END_REASON_END, 5)
    assert rejected(token_stub.EndSession, pb.EndSessionRequest(session_id="told")).code() == Code.NOT_FOUND
    assert rejected(token_stub.Snapshot, pb.SnapshotRequest(session_id="told")).code() == Code.NOT_FOUND
    stream.close()


def test_a_chunk_with_end_frees_the_session(token_artifact: Path, token_stub: pb_grpc.ConveyorStub) -> None:
    x = sequence(token_artifact)
    assert token_stub.Step(chunk("one-shot", x, 0, start=True, end=True), timeout=10).ended
    assert rejected(token_stub.Step, chunk("one-shot", x, len(x))).code() == Code.NOT_FOUND


@pytest.fixture(scope="module")
def clocked(token_artifact: Path) -> Iterator[tuple[RunningServer, FakeClock]]:
    """A server whose sessions age only when the test moves its clock; swept every 20 ms."""
    clock = FakeClock()
    with running(
        token_artifact, clock=clock, idle_ttl_s=60, replay_window_s=20, sweep_interval_s=0.02
    ) as server:
        yield server, clock


def test_an_expired_session_is_not_found(
    token_artifact: Path, clocked: tuple[RunningServer, FakeClock]
) -> None:
    server, clock = clocked
    x = sequence(token_artifact)
    with connect(server) as stub:
        start_session(stub, "short-lived", x[:4])
        clock.advance(30)
        assert_continues(stub, token_artifact, "short-lived", x[:8], 4)  # used: its idle time restarts
        clock.advance(61)
        error = rejected(stub.Step, chunk("short-lived", x[8:], 8))
    assert_error(error, Code.NOT_FOUND, "'short-lived' expired or never started")


def test_a_retry_after_the_replay_window_is_aborted_and_not_applied_again(
    token_artifact: Path, clocked: tuple[RunningServer, FakeClock]
) -> None:
    server, clock = clocked
    x = sequence(token_artifact)
    with connect(server) as stub:
        canary = RawStream(stub)  # its expiry shows that a sweep has run since the clock moved
        canary.call(chunk("canary", x[:1], 0, start=True))
        clock.advance(50)
        start_session(stub, "late-retry", x[:4])
        retry = chunk("late-retry", x[4:8], 4)
        stub.Step(retry, timeout=10)
        clock.advance(30)  # the canary is past the 60 s idle TTL; the retry past the 20 s replay window
        assert canary.receive().session_ended.session_id == "canary"
        error = rejected(stub.Step, retry)
        assert_error(error, Code.ABORTED, "has consumed 8 steps but the chunk's offset is 4")
        assert_continues(stub, token_artifact, "late-retry", x, 8)
        canary.close()


def test_streams_are_told_in_band_when_their_session_expires(
    token_artifact: Path, clocked: tuple[RunningServer, FakeClock]
) -> None:
    server, clock = clocked
    with connect(server) as stub:
        stream = RawStream(stub)
        stream.call(chunk("forgotten", sequence(token_artifact)[:3], 0, start=True))
        clock.advance(61)
        notice = stream.receive().session_ended  # the sweeper finds it within its 20 ms interval
        assert (notice.session_id, notice.reason, notice.steps) == ("forgotten", pb.END_REASON_TTL, 3)
        stream.close()
