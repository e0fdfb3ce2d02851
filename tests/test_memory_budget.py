"""What one client can make the server hold per session is bounded: a last response larger than the replay
budget is kept as a digest alone (its retry is ABORTED, never applied twice), and a server flooded with
sessions that each ask for 1024 steps of every output grows by little, not by every response it sent."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from local_services import conveyor_process
from serving_harness import assert_close, chunk, connect, make_inputs, offline, outputs, rejected, running

from serving.client import ClientOptions, ConveyorClient, RetryPolicy
from serving.wire import pb

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
