"""Replicas behind nginx (deploy/nginx/nginx.conf, on Debian's nginx): session-affine routing by the client's
x-conveyor-route header, failover when a replica dies, and a rolling restart under load. Two `conveyor serve`
processes share a real redis-server; every sequence's outputs are checked against one offline run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from local_services import RedisServer, conveyor_process, nginx_proxy, redis_server
from serving_harness import assert_close, make_inputs, offline

from serving.client import AsyncConveyorClient, ClientOptions, RetryPolicy
from serving.client.core import ROUTE_HEADER

pytestmark = pytest.mark.timeout(180)

SESSIONS, STEPS, CHUNK = 16, 30, 2
PATIENT = ClientOptions(
    route_key="gateway-1",
    retry=RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.25),
    timeout_s=10,
)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis", durable=True) as server:
        yield server


async def _stream_all(
    target: str, sequences: dict[str, np.ndarray], started: asyncio.Event, pause_s: float
) -> dict[str, np.ndarray]:
    """Every sequence over ONE multiplexed Stream, in chunks, concurrently; `started` is set once every
    session has had 4 steps answered."""
    counted = 0

    async def one(client: AsyncConveyorClient, session_id: str, x: np.ndarray) -> np.ndarray:
        nonlocal counted
        pieces = []
        async with client.session(session_id) as session:
            for offset in range(0, len(x), CHUNK):
                pieces.append(await session.send(x[offset : offset + CHUNK]))
                if offset + CHUNK == 4:
                    counted += 1
                    if counted == len(sequences):
                        started.set()
                await asyncio.sleep(pause_s)
        return np.concatenate(pieces)

    async with AsyncConveyorClient(target, PATIENT) as client:
        results = await asyncio.gather(*(one(client, s, x) for s, x in sequences.items()))
    return dict(zip(sequences, results, strict=True))


def test_the_nginx_config_routes_on_the_header_the_client_sends() -> None:
    conf = (Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf").read_text()
    assert f"hash $http_{ROUTE_HEADER.replace('-', '_')} consistent;" in conf
    assert "grpc_pass grpc://conveyor;" in conf


def test_a_replica_killed_mid_stream_leaves_every_session_to_the_survivor(
    token_artifact: Path, redis: RedisServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    sequences = {f"routed-{i}": make_inputs(token_artifact, STEPS, rng) for i in range(SESSIONS)}
    with (
        conveyor_process(token_artifact, redis.url) as one,
        conveyor_process(token_artifact, redis.url) as two,
        nginx_proxy(tmp_path, [one.port, two.port]) as proxy_port,
    ):

        async def scenario() -> dict[str, np.ndarray]:
            started = asyncio.Event()
            streaming = asyncio.ensure_future(
                _stream_all(f"127.0.0.1:{proxy_port}", sequences, started, 0.01)
            )
            await asyncio.wait_for(started.wait(), 60)
            answered = {replica: replica.chunks_answered() for replica in (one, two)}
            owner = max(answered, key=answered.__getitem__)
            assert min(answered.values()) == 0, answered  # one stream, one replica: affinity
            owner.kill()  # mid-stream: every session has steps left
            return await streaming

        streamed = asyncio.run(scenario())
        survivor = two if one.process is None else one
        assert survivor.chunks_answered() > 0
    for session_id, x in sequences.items():
        assert_close(streamed[session_id], offline(token_artifact, x))


def test_a_rolling_restart_under_load_loses_no_session(
    token_artifact: Path, redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM (graceful: exit 0, sessions stay in Redis), start again, then the other replica, while every
    session streams through nginx."""
    rng = np.random.default_rng(12)
    sequences = {f"rolling-{i}": make_inputs(token_artifact, 3 * STEPS, rng) for i in range(SESSIONS)}
    with (
        conveyor_process(token_artifact, redis.url) as one,
        conveyor_process(token_artifact, redis.url) as two,
        nginx_proxy(tmp_path, [one.port, two.port], fail_timeout_s=1) as proxy_port,
    ):

        async def scenario() -> dict[str, np.ndarray]:
            started = asyncio.Event()
            # 45 chunks a session, 0.3 s apart: the stream outlasts both restarts.
            streaming = asyncio.ensure_future(_stream_all(f"127.0.0.1:{proxy_port}", sequences, started, 0.3))
            await asyncio.wait_for(started.wait(), 60)
            for replica in (one, two):
                assert await asyncio.to_thread(replica.terminate) == 0
                await asyncio.to_thread(replica.start)
                await asyncio.sleep(1.2)  # past nginx's fail_timeout: the restarted replica is back in
            assert not streaming.done()  # the restarts happened under load
            return await streaming

        streamed = asyncio.run(scenario())
    for session_id, x in sequences.items():
        assert_close(streamed[session_id], offline(token_artifact, x))
