"""What one client can make the server hold per session is bounded: a last response larger than the replay
budget is kept as a digest alone (its retry is ABORTED, never applied twice), and a server flooded with
sessions that each ask for 1024 steps of every output grows by little, not by every response it sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest
from local_services import ServerProcess, conveyor_process
from serving_harness import (
    RawStream,
    assert_close,
    assert_error,
    chunk,
    connect,
    make_inputs,
    of_version,
    offline,
    outputs,
    rejected,
    running,
)

from serving.client import ClientOptions, ConveyorClient, RetryPolicy
from serving.client.scrape import scrape
from serving.wire import pb, pb_grpc

pytestmark = pytest.mark.timeout(180)


def test_a_response_over_the_budget_is_not_kept_and_its_retry_is_aborted(token_artifact: Path) -> None:
    x = make_inputs(token_artifact, 6, np.random.default_rng(2))
    per_step = 4 * int(offline(token_artifact, x[:1]).shape[1])  # bytes of one timestep's outputs
    with running(token_artifact, replay_max_bytes=per_step) as server, connect(server) as stub:
        small = chunk("budget", x[:1], 0, start=True)  # one step: its response fits the budget
        first = stub.Step(small, timeout=10)
        assert stub.Step(small, timeout=10).replayed  # kept: the retry is answered again
        big = chunk("budget", x[1:4], 1)  # three steps of outputs: over the budget
        second = stub.Step(big, timeout=10)
        error = rejected(stub.Step, big)
        assert error.code() == grpc.StatusCode.ABORTED
        assert f"larger than the {per_step} bytes a session keeps for retries" in str(error.details())
        assert "go on from offset 4" in str(error.details())  # and it was not applied twice:
        last = stub.Step(chunk("budget", x[4:], 4), timeout=10)
        streamed = np.concatenate([outputs(first), outputs(second), outputs(last)])
        assert_close(streamed, offline(token_artifact, x))
        lean = stub.Step(chunk("budget", x[:3], 0, start=True, reset=True, outputs=pb.OUTPUT_MODE_LAST))
        assert outputs(lean).shape[0] == 1  # LAST keeps one row: under the budget, kept for retries


def test_a_flood_of_sessions_asking_for_every_output_leaves_memory_bounded(token_artifact: Path) -> None:
    """100 sessions, each opened with one 1024-step chunk asking for every timestep's outputs (1.9 MB each).
    Under the default budget (64 KiB) the server stays within a few tens of MB; the control, a budget large
    enough to keep every response, shows what that prevents (~186 MB)."""
    bounded = _flood(token_artifact, {})
    unbounded = _flood(token_artifact, {"CONVEYOR_REPLAY_MAX_BYTES": str(8 << 20)})
    print(f"100 sessions x 1024 steps of all outputs: +{bounded:.1f} MB (budget), +{unbounded:.1f} MB (none)")
    assert bounded < 60 < 120 < unbounded


def _flood(artifact: Path, env: dict[str, str]) -> float:
    """MB of resident memory a server grows by over the flood."""
    x = make_inputs(artifact, 1024, np.random.default_rng(3))
    width = int(offline(artifact, x[:1]).shape[1])
    options = ClientOptions(retry=RetryPolicy(max_attempts=1), timeout_s=30, max_message_bytes=8 << 20)
    with (
        conveyor_process(artifact, "memory", env=env) as server,
        ConveyorClient(server.target, options) as client,
    ):
        client.session("warm-up").send(x)  # the first run's buffers are the baseline
        before = server.rss_bytes()
        for i in range(100):
            assert client.session(f"flood-{i}").send(x).shape == (1024, width)
        return (server.rss_bytes() - before) / 2**20


def test_a_stream_whose_client_stops_reading_holds_no_more_than_its_budget(token_artifact: Path) -> None:
    """A client sends 150 chunks of 1024 steps asking for every output (1.9 MB of responses each) on one
    Stream and reads nothing. The server reads on only while the stream holds less than its byte budget
    (CONVEYOR_STREAM_MAX_BYTES, 4 MiB): a few chunks are applied, then gRPC's flow control stops the
    client's writes, and other clients are served as before. The control, a budget of 1 GiB, lets the
    window of 256 unanswered chunks fill with responses."""
    bounded = _stalled_stream(token_artifact, {})
    unbounded = _stalled_stream(token_artifact, {"CONVEYOR_STREAM_MAX_BYTES": str(1 << 30)})
    print(f"a stream that is not read: {bounded} (budget), {unbounded} (1 GiB)")
    assert bounded.held_mb <= 4 + 2 and bounded.grew_mb < 60
    assert unbounded.applied > 3 * bounded.applied and unbounded.grew_mb > 150


def test_streams_past_the_limit_are_refused_naming_it(token_artifact: Path) -> None:
    x = make_inputs(token_artifact, 3, np.random.default_rng(4))
    with running(token_artifact, max_streams=2) as server, connect(server) as stub:
        open_streams = [RawStream(stub) for _ in range(2)]
        for i, stream in enumerate(open_streams):
            assert stream.call(chunk(f"s{i}", x, 0, start=True)).chunk.steps == 3
        refused = RawStream(stub)
        refused.send(chunk("s2", x, 0, start=True))
        with pytest.raises(grpc.RpcError) as error:
            refused.receive()
        assert_error(error.value, grpc.StatusCode.RESOURCE_EXHAUSTED, r"2 streams open, its limit")
        open_streams.pop().close()  # room for one more, once the server has seen it end
        assert _eventually(lambda: _opens(stub, chunk("s2", x, 0, start=True)))


def _opens(stub: pb_grpc.ConveyorStub, request: pb.ChunkRequest) -> bool:
    try:
        return RawStream(stub).call(request).chunk.steps > 0
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return False


class _Stall(NamedTuple):
    applied: int  # chunks the server applied before it stopped reading
    held_mb: float  # conveyor_held_bytes{kind="stream"} then
    grew_mb: float  # the server's resident memory growth

    def __str__(self) -> str:
        return f"{self.applied} chunks applied, {self.held_mb:.1f} MB held, +{self.grew_mb:.0f} MB resident"


def _stalled_stream(artifact: Path, env: dict[str, str]) -> _Stall:
    x = make_inputs(artifact, 1024, np.random.default_rng(5))
    requests = (chunk(f"stall-{i}", x, 0, start=True) for i in range(150))
    options = [("grpc.max_receive_message_length", 8 << 20)]
    with (
        conveyor_process(artifact, "memory", env=env) as server,
        ConveyorClient(server.target, ClientOptions(max_message_bytes=8 << 20)) as client,
    ):
        client.session("warm-up").send(x)
        before = server.rss_bytes()
        with grpc.insecure_channel(server.target, options=options) as channel:
            responses = pb_grpc.ConveyorStub(channel).Stream(requests)  # never read
            applied = (
                _settled(server, lambda metrics: metrics[of_version("conveyor_timesteps_total")]) // 1024 - 1
            )
            held = _stream_bytes(server)
            grew = server.rss_bytes() - before
            assert client.session("other").send(x[:5]).shape[0] == 5  # the server serves others
            responses.cancel()
        assert _eventually(lambda: _stream_bytes(server) == 0)
    return _Stall(int(applied), held / 2**20, grew / 2**20)


def _stream_bytes(server: ServerProcess) -> float:
    return scrape(server.metrics_url).by_key()['conveyor_held_bytes{kind="stream"}']


def _settled(server: ServerProcess, read: Callable[[dict[str, float]], float]) -> float:
    """`read` of the server's metrics once it has not changed for a second (at most 60 s)."""
    last, deadline = -1.0, time.monotonic() + 60
    while time.monotonic() < deadline:
        value = read(scrape(server.metrics_url).by_key())
        if value == last:
            return value
        last = value
        time.sleep(1.0)
    raise AssertionError(f"still changing after 60 s: {last}")


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
