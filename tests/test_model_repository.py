"""One server, many models and versions: a model repository watched while serving, sessions pinned to the
version they began on, rollouts that drop no session, and the drain deadline."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from local_services import conveyor_process, nginx_proxy, redis_server
from prometheus_client import CollectorRegistry
from serving_harness import (
    RawStream,
    assert_close,
    assert_error,
    chunk,
    connect,
    infer,
    make_inputs,
    offline,
    outputs,
    rejected,
    scrape,
    sequence,
    v2_output,
)

from serving.client import AsyncConveyorClient, ClientOptions, RetryPolicy
from serving.server.app import RunningServer, build_server
from serving.server.config import ServerConfig
from serving.wire import oip, oip_grpc, pb, pb_grpc

SESSIONS = 64  # on each version, under load
STEPS = 24
CUT = 8  # chunk length


def publish(artifact: Path, root: Path, name: str, number: int) -> Path:
    """Copy an artifact into the repository as `name`/`number`, as a deployment should: written aside, then
    renamed into place."""
    (root / name).mkdir(parents=True, exist_ok=True)
    staging = root / name / f".{number}.tmp"
    shutil.copytree(artifact, staging)
    target = root / name / str(number)
    staging.rename(target)
    return target


@contextmanager
def repository_server(root: Path, **overrides: Any) -> Iterator[RunningServer]:
    """A server of the repository `root` on free ports (the watcher slow: tests rescan when they need to)."""
    settings: dict[str, Any] = {"repository_poll_s": 60.0, "grace_s": 5.0, **overrides}
    config = ServerConfig(models_dir=root, port=0, metrics_port=0, **settings)
    with build_server(config, CollectorRegistry()) as server:
        yield server


def states(stub: pb_grpc.ConveyorStub) -> dict[tuple[str, int], str]:
    """ListModels as (model, version) -> state."""
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    return {(v.model, v.version): v.state for v in listed.versions}


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Streamed:
    """A session streamed in chunks of CUT steps over unary Steps, naming no version after its start."""

    def __init__(self, stub: pb_grpc.ConveyorStub, session_id: str, x: np.ndarray) -> None:
        self.stub, self.session_id, self.x = stub, session_id, x
        self.offset = 0
        self.outputs: list[np.ndarray] = []
        self.versions: set[int] = set()

    def step(self, end: bool = False) -> None:
        piece = self.x[self.offset : self.offset + CUT]
        request = chunk(self.session_id, piece, self.offset, start=self.offset == 0, end=end)
        response = self.stub.Step(request, timeout=30)
        self.outputs.append(outputs(response))
        self.versions.add(response.model_version)
        self.offset = response.steps

    def finish(self) -> None:
        while self.offset + CUT < len(self.x):
            self.step()
        self.step(end=True)

    @property
    def y(self) -> np.ndarray:
        return np.concatenate(self.outputs)


def test_a_rollout_under_load_keeps_every_session_on_its_version(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    with repository_server(tmp_path) as server, connect(server) as stub:
        old = [Streamed(stub, f"old-{i}", sequence(token_artifact, STEPS, seed=i)) for i in range(SESSIONS)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: s.step(), old))  # 64 sessions begin on version 1
            publish(rnn_artifact, tmp_path, "language", 2)  # a new version, mid-stream
            server.rescan()
            assert states(stub) == {("language", 1): "draining", ("language", 2): "ready"}
            new = [
                Streamed(stub, f"new-{i}", sequence(rnn_artifact, STEPS, seed=100 + i))
                for i in range(SESSIONS)
            ]
            # The old sessions go on while the new ones begin on version 2, interleaved.
            list(pool.map(lambda s: s.finish(), [*new, *old]))
        for session in old:
            assert session.versions == {1}
            assert_close(session.y, offline(token_artifact, session.x))
        for session in new:
            assert session.versions == {2}
            assert_close(session.y, offline(rnn_artifact, session.x))
        server.rescan()  # the last session of version 1 has ended: it retires
        assert states(stub)[("language", 1)] == "retired"
        _, samples = scrape(server)
        version_1 = 'model="language",reason="{}",version="1"'
        assert samples[f"conveyor_sessions_ended_total{{{version_1.format('end')}}}"] == SESSIONS
        assert samples[f"conveyor_sessions_ended_total{{{version_1.format('model_retired')}}}"] == 0
        retired = [key for key in samples if key.startswith("conveyor_model_info{")]
        assert [key for key in retired if 'state="retired",version="1"' in key] != []
        assert samples['conveyor_sessions_active{model="language",version="2"}'] == 0


def test_a_draining_version_takes_no_new_session_and_a_session_never_changes_version(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    with repository_server(tmp_path) as server, connect(server) as stub:
        x = sequence(token_artifact, 8)
        stub.Step(chunk("kept", x[:4], 0, start=True), timeout=10)
        publish(rnn_artifact, tmp_path, "language", 2)
        server.rescan()
        error = rejected(stub.Step, chunk("late", x[:4], 0, start=True, model_version="1"))
        assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "version 1 is draining")
        error = rejected(stub.Step, chunk("kept", x[4:], 4, model_version="2"))
        assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "runs on model 'language' version 1")
        error = rejected(stub.Step, chunk("kept", x[:4], 0, start=True, reset=True))
        assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "pinned at its start")
        info = stub.GetModelInfo(pb.ModelInfoRequest(model="language", model_version="1"), timeout=10)
        assert (info.version, info.version_state, info.cell) == (1, "draining", "lstm")
        assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10).version == 2
        last = stub.Step(chunk("kept", x[4:], 4, model_version="1", end=True), timeout=10)
        assert last.model_version == 1 and last.ended
        assert_close(outputs(last), offline(token_artifact, x)[4:])


def test_the_drain_deadline_ends_the_sessions_left_with_their_reason(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    with repository_server(tmp_path, drain_deadline_s=0.5) as server, connect(server) as stub:
        x = sequence(token_artifact, 8)
        stream = RawStream(stub)
        assert stream.call(chunk("left", x[:4], 0, start=True)).chunk.model_version == 1
        publish(rnn_artifact, tmp_path, "language", 2)
        server.rescan()
        time.sleep(0.6)
        server.rescan()  # past the deadline, a session left: retired all the same
        notice = stream.receive().session_ended
        assert (notice.session_id, notice.reason, notice.steps) == ("left", pb.END_REASON_MODEL_RETIRED, 4)
        error = rejected(stub.Step, chunk("left", x[4:], 4))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "version 1, which has been retired")
        stream.close()
        _, samples = scrape(server)
        ended = 'conveyor_sessions_ended_total{model="language",reason="model_retired",version="1"}'
        assert samples[ended] == 1
        assert states(stub)[("language", 1)] == "retired"


def test_labels_pin_what_they_name_and_move_only_to_a_ready_version(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    policy = tmp_path / "language" / "versions.json"
    policy.write_text(json.dumps({"labels": {"stable": 1}}))
    with repository_server(tmp_path) as server, connect(server) as stub:
        publish(rnn_artifact, tmp_path, "language", 2)
        policy.write_text(json.dumps({"labels": {"stable": 1, "canary": 2, "next": 3}}))
        server.rescan()
        # Labelled, version 1 stays served beside the newest; "next" names no version yet.
        assert states(stub) == {("language", 1): "ready", ("language", 2): "ready"}
        x = sequence(token_artifact, 4)
        assert stub.Step(chunk("s", x, 0, start=True, model_version="stable"), timeout=10).model_version == 1
        assert stub.Step(chunk("c", x, 0, start=True, model_version="canary"), timeout=10).model_version == 2
        assert stub.Step(chunk("n", x, 0, start=True), timeout=10).model_version == 2
        error = rejected(stub.Step, chunk("x", x, 0, start=True, model_version="next"))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "model 'language' version 'next' is not served")
        listed = {v.version: list(v.labels) for v in stub.ListModels(pb.ListModelsRequest()).versions}
        assert listed == {1: ["stable"], 2: ["canary"]}
        policy.write_text(json.dumps({"labels": {"stable": 2}}))
        server.rescan()
        assert states(stub)[("language", 1)] == "draining"  # its session "s" is still live


def test_a_version_that_does_not_load_leaves_the_others_serving(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    with repository_server(tmp_path) as server, connect(server) as stub:
        broken = publish(rnn_artifact, tmp_path, "language", 2)
        (broken / "model.onnx").write_bytes(b"not a model")
        server.rescan()
        listed = {v.version: v for v in stub.ListModels(pb.ListModelsRequest()).versions}
        assert (listed[1].state, listed[2].state) == ("ready", "failed")
        assert "fingerprint does not match" in listed[2].message
        x = sequence(token_artifact, 4)
        assert stub.Step(chunk("s", x, 0, start=True), timeout=10).model_version == 1
        shutil.copy(rnn_artifact / "model.onnx", broken / "model.onnx")  # fixed: tried again
        server.rescan()
        assert states(stub) == {("language", 1): "draining", ("language", 2): "ready"}


def test_one_server_serves_several_models(
    token_artifact: Path, feature_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    publish(feature_artifact, tmp_path, "sensor", 3)
    with repository_server(tmp_path) as server, connect(server) as stub:
        tokens, features = sequence(token_artifact, 6), sequence(feature_artifact, 6)
        error = rejected(stub.Step, chunk("a", tokens, 0, start=True))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "serves several models")
        language = stub.Step(chunk("a", tokens, 0, start=True, model="language"), timeout=10)
        sensor = stub.Step(chunk("a", features, 0, start=True, model="sensor"), timeout=10)
        assert (language.model, language.model_version, sensor.model, sensor.model_version) == (
            "language",
            1,
            "sensor",
            3,
        )
        assert_close(outputs(language), offline(token_artifact, tokens))
        assert_close(outputs(sensor), offline(feature_artifact, features))
        info = stub.GetModelInfo(pb.ModelInfoRequest(model="sensor"), timeout=10)
        assert (info.input_kind, info.version) == ("features", 3)
        error = rejected(stub.GetModelInfo, pb.ModelInfoRequest(model="speech"))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "'language' version 1; 'sensor' version 3")


def test_a_repository_with_nothing_to_serve_does_not_start(tmp_path: Path) -> None:
    (tmp_path / "language" / "1").mkdir(parents=True)
    with pytest.raises(Exception, match="holds no model that loads"), repository_server(tmp_path):
        pass


PATIENT = ClientOptions(
    route_key="gateway-1",
    retry=RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.25),
    timeout_s=10,
)


@pytest.mark.timeout(180)
def test_across_replicas_a_session_goes_on_on_its_version(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    """Two replicas of one repository on one Redis, behind nginx: v2 lands mid-stream, the replica holding
    the stream is killed, and every session finishes on its version on the survivor."""
    repository, redis_dir = tmp_path / "models", tmp_path / "redis"
    publish(token_artifact, repository, "language", 1)
    redis_dir.mkdir()
    env = {"CONVEYOR_REPOSITORY_POLL_S": "0.2"}
    rng = np.random.default_rng(5)
    old = {f"old-{i}": make_inputs(token_artifact, STEPS, rng) for i in range(8)}
    new = {f"new-{i}": make_inputs(token_artifact, STEPS, rng) for i in range(8)}
    with (
        redis_server(redis_dir, durable=True) as redis,
        conveyor_process(repository, redis.url, env=env, repository=True) as one,
        conveyor_process(repository, redis.url, env=env, repository=True) as two,
        nginx_proxy(tmp_path, [one.port, two.port]) as proxy_port,
    ):

        async def scenario() -> dict[str, np.ndarray]:
            async with AsyncConveyorClient(f"127.0.0.1:{proxy_port}", PATIENT) as client:
                sessions = {i: client.session(i) for i in [*old, *new]}
                firsts = {i: await sessions[i].send(old[i][:CUT]) for i in old}
                publish(rnn_artifact, repository, "language", 2)
                for replica in (one, two):
                    await asyncio.to_thread(wait_for, functools.partial(serves_only_v2, replica.target))
                firsts |= {i: await sessions[i].send(new[i][:CUT]) for i in new}
                owner = max((one, two), key=lambda replica: replica.chunks_answered())
                owner.kill()  # the survivor holds no pin: it finds each session's version in Redis

                async def rest(session_id: str, x: np.ndarray) -> np.ndarray:
                    session = sessions[session_id]
                    pieces = [firsts[session_id]]
                    pieces += [await session.send(x[o : o + CUT]) for o in range(CUT, STEPS - CUT, CUT)]
                    pieces.append(await session.send(x[STEPS - CUT :], end=True))
                    return np.concatenate(pieces)

                every = {**old, **new}
                results = await asyncio.gather(*(rest(i, x) for i, x in every.items()))
            return dict(zip(every, results, strict=True))

        streamed = asyncio.run(scenario())
        survivor = two if one.process is None else one
        wait_for(lambda: versions_of(survivor.target).get(1) == "retired")
    for session_id, x in old.items():
        assert_close(streamed[session_id], offline(token_artifact, x))
    for session_id, x in new.items():
        assert_close(streamed[session_id], offline(rnn_artifact, x))


def test_a_replica_without_the_sessions_version_says_so(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        first, second = tmp_path / "first", tmp_path / "second"
        publish(token_artifact, first, "language", 1)
        publish(rnn_artifact, second, "language", 2)
        with (
            repository_server(first, store=redis.url) as older,
            repository_server(second, store=redis.url) as newer,
        ):
            x = sequence(token_artifact, 8)
            with connect(older) as stub:
                stub.Step(chunk("s", x[:4], 0, start=True), timeout=10)
            with connect(newer) as stub:
                error = rejected(stub.Step, chunk("s", x[4:], 4, model_version="1"))
                assert_error(error, grpc.StatusCode.NOT_FOUND, "version '1' is not served here.*version 2")
                error = rejected(stub.Step, chunk("s", x[4:], 4))  # naming none: as any unknown session
                assert_error(error, grpc.StatusCode.NOT_FOUND, "expired or never started")
            with connect(older) as stub:  # untouched by the refusals
                response = stub.Step(chunk("s", x[4:], 4, end=True), timeout=10)
                assert_close(outputs(response), offline(token_artifact, x)[4:])


def versions_of(target: str) -> dict[int, str]:
    """A server's versions of `language` and their states."""
    with grpc.insecure_channel(target) as channel:
        return {version: state for (_, version), state in states(pb_grpc.ConveyorStub(channel)).items()}


def serves_only_v2(target: str) -> bool:
    """Whether a server gives new sessions of `language` version 2 alone."""
    return [version for version, state in versions_of(target).items() if state == "ready"] == [2]


def test_frames_of_two_versions_go_apart_and_each_session_stays_on_its_own(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    """The asyncio client packs sessions into frames per version; each frame runs on one version."""
    publish(token_artifact, tmp_path, "language", 1)
    rng = np.random.default_rng(9)
    old = {f"old-{i}": make_inputs(token_artifact, STEPS, rng) for i in range(4)}
    new = {f"new-{i}": make_inputs(token_artifact, STEPS, rng) for i in range(4)}
    with repository_server(tmp_path) as server:

        async def scenario() -> dict[str, np.ndarray]:
            async with AsyncConveyorClient(f"127.0.0.1:{server.port}") as client:
                sessions = {i: client.session(i, via="frames") for i in [*old, *new]}
                pieces = {i: [await sessions[i].send(old[i][:CUT])] for i in old}
                publish(rnn_artifact, tmp_path, "language", 2)
                await asyncio.to_thread(server.rescan)
                every = {**old, **new}
                for offset in range(0, STEPS, CUT):  # the new sessions begin; then all go on, at once
                    sending = {i: x for i, x in every.items() if offset > 0 or i in new}
                    answers = await asyncio.gather(
                        *(sessions[i].send(x[offset : offset + CUT]) for i, x in sending.items())
                    )
                    for session_id, answer in zip(sending, answers, strict=True):
                        pieces.setdefault(session_id, []).append(answer)
                return {i: np.concatenate(p) for i, p in pieces.items()}

        streamed = asyncio.run(scenario())
    for session_id, x in old.items():
        assert_close(streamed[session_id], offline(token_artifact, x))
    for session_id, x in new.items():
        assert_close(streamed[session_id], offline(rnn_artifact, x))


def test_triton_clients_route_by_model_name_and_version(
    token_artifact: Path, rnn_artifact: Path, tmp_path: Path
) -> None:
    publish(token_artifact, tmp_path, "language", 1)
    with repository_server(tmp_path) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        x = sequence(token_artifact, 8)
        assert stub.ModelInfer(infer(x[:4], 7, start=True)).model_version == "1"
        publish(rnn_artifact, tmp_path, "language", 2)
        server.rescan()
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="language"))
        assert list(metadata.versions) == ["1", "2"]
        error = rejected(stub.ModelInfer, infer(x[:4], 8, start=True, version="1"))
        assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "version 1 is draining")
        old = stub.ModelInfer(infer(x[4:], 7, end=True))  # the sequence stays on version 1
        assert old.model_version == "1"
        assert_close(v2_output(old), offline(token_artifact, x)[4:])
        new = stub.ModelInfer(infer(x, 8, start=True, end=True))
        assert new.model_version == "2"
        assert_close(v2_output(new), offline(rnn_artifact, x))
