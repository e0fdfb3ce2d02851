"""Sessions that outlive their process: servers on the Redis store (a real redis-server), restarted, killed,
cut off from Redis, and racing on one session. Every case checks the outputs against one offline run of
each whole sequence, and the offsets: no step lost, none applied twice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from local_services import RedisServer, conveyor_process, free_port, redis_server
from serving_harness import (
    assert_close,
    chunk,
    connect,
    make_inputs,
    of_version,
    offline,
    outputs,
    running,
    scrape,
)

from serving.client import ClientOptions, ConveyorClient, ConveyorError, RetryPolicy
from serving.client.frames import pack
from serving.domain.errors import StoreUnavailableError
from serving.server.app import RunningServer
from serving.wire.tensors import decode

pytestmark = pytest.mark.timeout(120)

SESSIONS, STEPS, HALF = 8, 24, 12


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, durable=True) as server:
        yield server


def _sequences(artifact: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"durable-{i}": make_inputs(artifact, STEPS, rng) for i in range(SESSIONS)}


def _stream(target: str, x: np.ndarray, session_id: str, start: int, stop: int) -> np.ndarray:
    """Steps [start, stop) of `x` as chunks of 3 over a fresh connection; the session starts at 0."""
    with ConveyorClient(target) as client:
        session = client.session(session_id) if start == 0 else client.attach(session_id, start)
        return np.concatenate([session.send(x[a : a + 3]) for a in range(start, stop, 3)])


def test_a_restarted_server_resumes_every_session(token_artifact: Path, redis: RedisServer) -> None:
    sequences = _sequences(token_artifact)
    first: dict[str, np.ndarray] = {}
    with running(token_artifact, store=redis.url) as server:
        target = f"127.0.0.1:{server.port}"
        for session_id, x in sequences.items():
            first[session_id] = _stream(target, x, session_id, 0, HALF)
        _, samples = scrape(server)
    assert samples[of_version("conveyor_sessions_active")] == SESSIONS
    with running(token_artifact, store=redis.url) as restarted:  # stopped gracefully: sessions stay
        _, samples = scrape(restarted)
        assert samples[of_version("conveyor_sessions_ended_total", reason="shutdown")] == 0
        for session_id, x in sequences.items():
            rest = _stream(f"127.0.0.1:{restarted.port}", x, session_id, HALF, STEPS)
            assert_close(np.concatenate([first[session_id], rest]), offline(token_artifact, x))


def test_kill_9_mid_stream_loses_no_step(token_artifact: Path, redis: RedisServer) -> None:
    """Streams run on replica A until it is killed (SIGKILL) mid-stream. Each client then does what a client
    does when its connection breaks: resends the chunk whose answer it lost, at the same offset, to replica
    B, and goes on from there. B loads the sessions from Redis: a chunk A applied before dying is answered
    from its replay, one it did not is applied now; either way the offsets line up."""
    sequences = _sequences(token_artifact)
    with (
        conveyor_process(token_artifact, redis.url) as replica_a,
        conveyor_process(token_artifact, redis.url) as replica_b,
    ):
        target_a, target_b = replica_a.target, replica_b.target
        acknowledged: dict[str, list[np.ndarray]] = {session_id: [] for session_id in sequences}
        lost: dict[str, int] = {}  # the offset of the chunk whose answer never came
        under_way = threading.Barrier(len(sequences) + 1)

        def feed(session_id: str, x: np.ndarray) -> None:
            options = ClientOptions(retry=RetryPolicy(max_attempts=1))  # no retries: see where A died
            with ConveyorClient(target_a, options) as client:
                session = client.session(session_id)
                for offset in range(0, STEPS, 2):
                    if offset == 4:
                        under_way.wait(30)
                    try:
                        acknowledged[session_id].append(session.send(x[offset : offset + 2]))
                    except ConveyorError:
                        lost[session_id] = offset
                        return
                    time.sleep(0.01)

        threads = [threading.Thread(target=feed, args=item) for item in sequences.items()]
        for thread in threads:
            thread.start()
        under_way.wait(30)  # every stream has 4 steps acknowledged and is sending more
        replica_a.kill()
        for thread in threads:
            thread.join(30)
        assert set(lost) == set(sequences)  # every stream was cut off mid-sequence
        for session_id, x in sequences.items():
            offset = lost[session_id]
            assert offset == 2 * len(acknowledged[session_id]) < STEPS
            with ConveyorClient(target_b) as client:
                resent = client.attach(session_id, offset).send(x[offset : offset + 2])
            pieces = [*acknowledged[session_id], resent]
            if offset + 2 < STEPS:
                pieces.append(_stream(target_b, x, session_id, offset + 2, STEPS))
            assert_close(np.concatenate(pieces), offline(token_artifact, x))


def test_redis_down_mid_run_is_unavailable_and_retries_succeed_once_it_is_back(
    token_artifact: Path, redis: RedisServer
) -> None:
    x = make_inputs(token_artifact, 12, np.random.default_rng(3))
    with running(token_artifact, store=redis.url) as server, connect(server) as stub:
        first = stub.Step(chunk("through-outage", x[:6], 0, start=True), timeout=10)
        redis.stop()
        with pytest.raises(grpc.RpcError) as failed:
            stub.Step(chunk("through-outage", x[6:], 6), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "session store is unreachable" in str(failed.value.details())
        restarter = threading.Timer(1.0, redis.start)
        restarter.start()
        options = ClientOptions(retry=RetryPolicy(max_attempts=30, initial_backoff_s=0.1, max_backoff_s=0.3))
        with ConveyorClient(f"127.0.0.1:{server.port}", options) as client:
            rest = client.attach("through-outage", 6).send(x[6:])  # retried until Redis is back
        restarter.join()
        assert_close(np.concatenate([outputs(first), rest]), offline(token_artifact, x))
        _, samples = scrape(server)
        assert samples['conveyor_store_errors_total{kind="unreachable"}'] >= 1


def test_a_server_refuses_to_start_without_its_store(token_artifact: Path) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    with (
        pytest.raises(StoreUnavailableError, match=r"cannot reach redis://127\.0\.0\.1"),
        running(token_artifact, store=unreachable),
    ):
        pass
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(token_artifact), "--port", "0"],
        env={**os.environ, "CONVEYOR_STORE": unreachable, "CONVEYOR_METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "conveyor serve: error: the session store is unreachable (cannot reach" in result.stderr


def test_two_replicas_racing_on_one_session_apply_each_offset_once(
    token_artifact: Path, redis: RedisServer
) -> None:
    """Routing bypassed: every chunk goes to both replicas at once. One applies it; the other answers the
    replay of what the first applied (or, when it started second, is told the session moved on)."""
    x = make_inputs(token_artifact, 40, np.random.default_rng(5))
    with (
        running(token_artifact, store=redis.url) as one,
        running(token_artifact, store=redis.url) as two,
        connect(one) as stub_one,
        connect(two) as stub_two,
        ThreadPoolExecutor(2) as pool,
    ):
        pieces = []
        for offset in range(0, len(x), 4):
            request = chunk("raced", x[offset : offset + 4], offset, start=offset == 0)
            answers = [pool.submit(_answer, stub, request) for stub in (stub_one, stub_two)]
            results = [answer.result() for answer in answers]
            applied = [r for r in results if isinstance(r, np.ndarray)]
            assert applied, results  # at least one answer carries the outputs
            for other in applied[1:]:
                assert np.array_equal(other, applied[0])  # the replay is what was applied
            pieces.append(applied[0])
        assert_close(np.concatenate(pieces), offline(token_artifact, x))
        assert _applied_steps(one) + _applied_steps(two) == len(x)  # each offset applied exactly once


def test_frames_alternate_between_replicas_on_one_store_in_few_round_trips(
    token_artifact: Path, redis: RedisServer
) -> None:
    """A gateway's frames, each to the other replica: every session continues wherever its last frame went,
    and a frame's look-ups and writes go to Redis together, not one round trip per session (new sessions are
    created one by one, each checked against the capacity: the first frame is not counted)."""
    sequences = _sequences(token_artifact)
    ids = list(sequences)
    with (
        running(token_artifact, store=redis.url) as one,
        running(token_artifact, store=redis.url) as two,
        connect(one) as stub_one,
        connect(two) as stub_two,
    ):
        got: list[list[np.ndarray]] = [[] for _ in ids]
        trips = []
        for number, offset in enumerate(range(0, STEPS, 4)):
            requests = [
                chunk(sid, sequences[sid][offset : offset + 4], offset, start=offset == 0) for sid in ids
            ]
            stub = (stub_one, stub_two)[number % 2]
            [response] = list(stub.Frames(iter([pack(requests, str(number))]), timeout=10))
            assert not response.result.errors, response.result.errors
            for row, piece in enumerate(decode(response.result.outputs)):
                got[row].append(piece)
            trips.append(_round_trips(one) + _round_trips(two))
        assert trips[-1] - trips[0] == 2 * (len(trips) - 1)  # a look-up and a write per frame of 8 sessions
    for sid, pieces in zip(ids, got, strict=True):
        assert_close(np.concatenate(pieces), offline(token_artifact, sequences[sid]))


def _round_trips(server: RunningServer) -> float:
    _, samples = scrape(server)
    return samples["conveyor_store_round_trip_seconds_count"]


def _answer(stub: object, request: object) -> np.ndarray | str:
    try:
        response = stub.Step(request, timeout=10)  # type: ignore[attr-defined]
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.ABORTED, error  # moved on: never a second application
        return str(error.code())
    return outputs(response)


def _applied_steps(server: RunningServer) -> float:
    _, samples = scrape(server)
    return samples[of_version("conveyor_timesteps_total")]
