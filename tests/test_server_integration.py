"""A real server on free ports, over real channels: outputs, batching, metrics, health, graceful stop."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry
from serving_harness import (
    RawStream,
    assert_close,
    card,
    chunk,
    connect,
    health_status,
    make_inputs,
    of_version,
    offline,
    outputs,
    random_cuts,
    running,
    scrape,
)

from serving.domain.errors import ModelLoadError
from serving.domain.runner import Arrays
from serving.domain.sessions.slab import PAGE_ROWS
from serving.server.app import RunningServer, build_server
from serving.server.config import ServerConfig
from serving.server.metrics import HELD_KINDS
from serving.server.onnx_runner import OnnxStepRunner
from serving.wire import pb, pb_grpc

pytestmark = pytest.mark.timeout(60)

Served = tuple[Path, RunningServer]


@pytest.fixture(scope="module", params=["token_artifact", "feature_artifact", "gru_artifact", "rnn_artifact"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """One batching server per artifact (LSTMs of tokens and of features, a GRU, a plain RNN), shared by this
    module's tests."""
    artifact: Path = request.getfixturevalue(request.param)
    with running(artifact, max_batch_size=64) as server:
        yield artifact, server


def _send_whole(stub: pb_grpc.ConveyorStub, session_id: str, x: np.ndarray, cuts: list[tuple[int, int]],
                via_stream: bool) -> list[np.ndarray]:  # fmt: skip
    requests = [chunk(session_id, x[a:b], a, start=a == 0) for a, b in cuts]
    if not via_stream:
        return [outputs(stub.Step(request, timeout=10)) for request in requests]
    stream = RawStream(stub)
    got = [outputs(stream.call(request).chunk) for request in requests]
    assert stream.close() == []
    return got


def test_random_chunkings_over_streams_steps_and_reconnects_match_offline(served: Served) -> None:
    artifact, server = served
    rng = np.random.default_rng(7)
    for trial in range(3):
        x = make_inputs(artifact, 90, rng)
        groups = np.array_split(np.array(random_cuts(len(x), rng)), 4)
        got: list[np.ndarray] = []
        for index, group in enumerate(groups):
            with connect(server) as stub:  # every group on a new connection: a reconnect
                cuts = [(int(a), int(b)) for a, b in group]
                got += _send_whole(stub, f"whole-{trial}", x, cuts, via_stream=index % 2 == 0)
        assert_close(np.concatenate(got), offline(artifact, x))


def _interleaved(
    artifact: Path, sessions: int, seed: int
) -> tuple[dict[str, np.ndarray], list[pb.ChunkRequest]]:
    """Sequences of mixed lengths, cut at random, as one request list that round-robins over the sessions."""
    rng = np.random.default_rng(seed)
    sequences = {
        f"mix-{seed}-{i}": make_inputs(artifact, int(rng.integers(5, 40)), rng) for i in range(sessions)
    }
    queues = {sid: random_cuts(len(x), rng) for sid, x in sequences.items()}
    requests = []
    while any(queues.values()):
        for sid, cuts in queues.items():
            if cuts:
                a, b = cuts.pop(0)
                x = sequences[sid]
                requests.append(chunk(sid, x[a:b], a, start=a == 0, end=b == len(x), request_id=f"{sid}/{a}"))
    return sequences, requests


def _stream_all(server: RunningServer, requests: list[pb.ChunkRequest]) -> dict[str, np.ndarray]:
    """Send every request on one stream at once; each session's outputs, concatenated in offset order."""
    pieces: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    with connect(server) as stub:
        for response in stub.Stream(iter(requests), timeout=30):
            assert response.WhichOneof("kind") != "error", response.error
            if response.HasField("chunk"):
                pieces[response.chunk.session_id].append((response.chunk.offset, outputs(response.chunk)))
    return {
        sid: np.concatenate([y for _, y in sorted(parts, key=lambda p: p[0])])
        for sid, parts in pieces.items()
    }


def test_interleaved_sessions_on_one_stream_match_each_alone(served: Served) -> None:
    artifact, server = served
    sequences, requests = _interleaved(artifact, sessions=64, seed=1)
    got = _stream_all(server, requests)
    for sid, x in sequences.items():
        assert_close(got[sid], offline(artifact, x))


def test_batched_outputs_equal_unbatched(served: Served) -> None:
    artifact, batched = served
    sequences, requests = _interleaved(artifact, sessions=48, seed=2)
    with running(artifact, max_batch_size=1) as unbatched:
        alone = _stream_all(unbatched, requests)
        _, unbatched_samples = scrape(unbatched)
    together = _stream_all(batched, requests)
    for sid in sequences:
        assert_close(together[sid], alone[sid])
    _, samples = scrape(batched)
    # Batching really happened on one server and never on the other.
    assert samples['conveyor_batch_size_bucket{le="1.0"}'] < samples["conveyor_batch_size_count"]
    assert (
        unbatched_samples['conveyor_batch_size_bucket{le="1.0"}']
        == unbatched_samples["conveyor_batch_size_count"]
    )


def test_model_info_describes_the_card(served: Served) -> None:
    artifact, server = served
    with connect(server) as stub:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    model = card(artifact)
    assert (info.name, info.input_kind, info.input_size) == (
        model["name"],
        model["input"]["kind"],
        model["input"]["size"],
    )
    assert (info.layers, info.hidden, info.output_size) == (
        model["layers"],
        model["hidden"],
        model["output"]["size"],
    )
    assert info.fingerprint == model["onnx_sha256"]
    assert info.cell == model["cell"]
    names = ["h", "c"] if model["cell"] == "lstm" else ["h"]
    per_session = [model["layers"], model["hidden"]]
    assert [(tensor.name, list(tensor.shape)) for tensor in info.state] == [(n, per_session) for n in names]
    assert list(info.vocabulary) == (model["vocabulary"] or [])
    assert info.max_chunk_steps == 1024 and info.idle_ttl_s == 600


def test_health_serving_and_reflection(served: Served) -> None:
    _, server = served
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server, "conveyor.v1.Conveyor") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "conveyor.v1.Conveyor" in services and "grpc.health.v1.Health" in services


def test_metrics_scrape_counts_chunks_and_sessions_without_session_ids(token_artifact: Path) -> None:
    x = make_inputs(token_artifact, 12, np.random.default_rng(3))
    requests = [
        chunk("tenant-a-0001", x[:5], 0, start=True),
        chunk("tenant-a-0001", x[5:], 5),
        chunk("tenant-b-0002", x, 0, start=True, end=True),
        chunk("tenant-c-0003", x, 0),  # never started: NOT_FOUND, in band
    ]
    with running(token_artifact) as server:
        with connect(server) as stub:
            kinds = [response.WhichOneof("kind") for response in stub.Stream(iter(requests), timeout=10)]
            stub.Step(chunk("tenant-a-0001", x[:2], 12), timeout=5)
        text, samples = scrape(server)
    assert sorted(kinds) == ["chunk", "chunk", "chunk", "error", "session_ended"]
    assert samples[of_version("conveyor_chunk_latency_seconds_count")] == len(requests) + 1
    assert samples[of_version("conveyor_sessions_active")] == 1
    assert samples[of_version("conveyor_sessions_started_total")] == 2
    assert samples[of_version("conveyor_sessions_ended_total", reason="end")] == 1
    assert samples['conveyor_chunk_errors_total{code="NOT_FOUND"}'] == 1
    assert samples[of_version("conveyor_timesteps_total")] == 5 + 7 + 12 + 2
    assert samples["conveyor_state_bytes"] == 2 * 1 * 32 * 4
    row_bytes = 4 * offline(token_artifact, x[:1]).shape[1]  # one timestep's outputs
    held = {kind: samples[f'conveyor_held_bytes{{kind="{kind}"}}'] for kind in HELD_KINDS}
    assert held == {
        "state": PAGE_ROWS * 2 * 1 * 32 * 4,  # one page of the state slab
        "replay": 2 * row_bytes,  # tenant-a's last chunk, 2 steps
        "ended_replay": 12 * row_bytes,  # tenant-b ended with its 12-step chunk
        "stream": 0,  # the stream has ended
    }
    assert samples["conveyor_batch_size_count"] == samples["conveyor_inference_seconds_count"] >= 1
    fingerprint = card(token_artifact)["onnx_sha256"]
    info = f'conveyor_model_info{{fingerprint="{fingerprint}",name="language",state="ready",version="1"}}'
    assert samples[info] == 1
    step_ok = (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Step",grpc_service="conveyor.v1.Conveyor"}'
    )
    assert samples[step_ok] == 1
    assert "tenant" not in text


class GatedRunner(OnnxStepRunner):
    """The real runner, but once armed every run waits to be released: a chunk held in flight on demand."""

    gate: threading.Event | None = None
    entered = threading.Event()

    def run(self, x: np.ndarray, states: np.ndarray) -> Arrays:
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(20)
        return super().run(x, states)


def _poll(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_graceful_stop_drains_in_flight_chunks_and_tells_streams(token_artifact: Path) -> None:
    runner = GatedRunner.load(token_artifact)
    x = make_inputs(token_artifact, 6, np.random.default_rng(4))
    with (
        # Every batch on the runner thread: the loop answers health checks and refusals while one is held.
        running(token_artifact, runner=runner, inline_batch_max_ms=0) as server,
        connect(server) as stub,
        ThreadPoolExecutor(1) as pool,
    ):
        stream = RawStream(stub)
        assert stream.call(chunk("watched", x, 0, start=True)).HasField("chunk")
        runner.gate, runner.entered = threading.Event(), threading.Event()
        in_flight = pool.submit(stub.Step, chunk("busy", x, 0, start=True), timeout=30)
        assert runner.entered.wait(10)
        stopping = server.request_stop()
        _poll(lambda: health_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as late:
            stub.Step(chunk("late", x, 0, start=True), timeout=5)
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in str(
            late.value.details()
        )
        runner.gate.set()
        assert in_flight.result(timeout=10).steps == len(x)
        stopping.result(timeout=10)
        notices = stream.close()
    assert [(n.session_ended.session_id, n.session_ended.reason) for n in notices] == [
        ("watched", pb.END_REASON_SHUTDOWN)
    ]


def test_refuses_to_start_without_a_valid_model(token_artifact: Path, tmp_path: Path) -> None:
    def build(directory: Path) -> None:
        build_server(ServerConfig(model_dir=directory, port=0, metrics_port=0), CollectorRegistry()).stop()

    with pytest.raises(ModelLoadError, match=r"no model.onnx in .*: run conveyor export"):
        build(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(token_artifact, broken)
    model = card(broken)
    (broken / "model.json").write_text(json.dumps({**model, "onnx_sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match=r"model\.json fingerprint does not match model\.onnx"):
        build(broken)
    garbage = b"not an onnx graph"
    (broken / "model.onnx").write_bytes(garbage)
    (broken / "model.json").write_text(
        json.dumps({**model, "onnx_sha256": hashlib.sha256(garbage).hexdigest()})
    )
    with pytest.raises(ModelLoadError, match="corrupt model"):
        build(broken)


def test_taken_ports_are_reported_readably(token_artifact: Path) -> None:
    with running(token_artifact) as taken:
        for grpc_port, metrics_port, message in (
            (taken.port, 0, f"cannot serve gRPC on 127.0.0.1:{taken.port}"),
            (0, taken.metrics_port, "cannot serve /metrics on .*: Address already in use"),
        ):
            config = ServerConfig(model_dir=token_artifact, port=grpc_port, metrics_port=metrics_port)
            with pytest.raises(OSError, match=message):
                build_server(config, CollectorRegistry()).stop()


_SERVE = """
import logging, os
from serving.server.config import ServerConfig
from serving.server.app import serve
logging.basicConfig(level=logging.INFO, format="%(message)s")
serve(ServerConfig.from_env(os.environ))
"""


def test_serve_logs_its_ports_then_stops_cleanly_on_sigterm(token_artifact: Path) -> None:
    env = {
        **os.environ,
        "CONVEYOR_MODEL_DIR": str(token_artifact),
        "CONVEYOR_PORT": "0",
        "CONVEYOR_METRICS_PORT": "0",
    }
    process = subprocess.Popen([sys.executable, "-c", _SERVE], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        model, ready = process.stderr.readline(), process.stderr.readline()
        version = re.search(r"model language version 1: ready \(fingerprint ([0-9a-f]{64})\)", model)
        assert version and version[1] == card(token_artifact)["onnx_sha256"], model
        found = re.search(r"serving on 127\.0\.0\.1:(\d+) \(gRPC\)", ready)
        assert found, ready
        with grpc.insecure_channel(f"127.0.0.1:{found[1]}") as channel:
            request = health_pb2.HealthCheckRequest()
            assert (
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
