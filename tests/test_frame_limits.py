"""Frames whose results pass a message limit: the language model's 454 outputs x 32 steps x 256 sessions is a
14.9 MB result, over gRPC's 4 MiB default receive limit. The server answers it in parts, each under the limit
the frame names (4 MiB when it names none); the client joins them; a limit no part could meet is refused."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import chunk, make_inputs, offline, running

from serving.client import AsyncConveyorClient, ClientOptions
from serving.client.frames import join_parts, pack
from serving.server.app import RunningServer
from serving.wire import pb, pb_grpc
from serving.wire.tensors import decode

pytestmark = pytest.mark.timeout(120)
SESSIONS, STEPS = 256, 32
GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def wide(token_artifact: Path) -> Iterator[RunningServer]:
    with running(token_artifact, max_batch_size=SESSIONS) as server:
        yield server


def _inputs(artifact: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([make_inputs(artifact, STEPS, rng) for _ in range(SESSIONS)])


def _frame(x: np.ndarray, prefix: str, offsets: list[int] | None = None) -> pb.Frame:
    """Every session of `x` starting, with `offsets` (default 0)."""
    offsets = offsets or [0] * len(x)
    pairs = enumerate(zip(x, offsets, strict=True))
    rows = [chunk(f"{prefix}{i}", row, offset, start=True) for i, (row, offset) in pairs]
    return pack(rows, prefix)


def _parts(server: RunningServer, frame: pb.Frame) -> list[pb.FrameResponse]:
    """Every FrameResponse to `frame` through a channel with gRPC's default (4 MiB) receive limit."""
    requests: queue.Queue[pb.Frame | None] = queue.Queue()
    requests.put(frame)
    answers = []
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for response in pb_grpc.ConveyorStub(channel).Frames(iter(requests.get, None), timeout=60):
            answers.append(response)
            if response.WhichOneof("kind") != "result" or not response.result.more:
                requests.put(None)
    return answers


def test_a_result_over_the_default_receive_limit_arrives_in_parts_under_it(
    wide: RunningServer, token_artifact: Path
) -> None:
    x = _inputs(token_artifact)
    offsets = [0] * SESSIONS
    offsets[200] = 5  # one session fails alone: its error is indexed in the frame, not in its part
    answers = _parts(wide, _frame(x, "w", offsets))
    parts = [answer.result for answer in answers]
    assert len(parts) >= 4  # 14.9 MB in parts of at most 4 MiB
    assert all(answer.ByteSize() <= GRPC_DEFAULT_RECEIVE_BYTES for answer in answers)
    assert [part.more for part in parts] == [True] * (len(parts) - 1) + [False]
    firsts = [part.first_index for part in parts]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    joined = join_parts(parts)
    assert list(joined.session_ids) == [f"w{i}" for i in range(SESSIONS)]
    assert [error.index for error in joined.errors] == [200]
    assert "offset" in joined.errors[0].message
    outputs = decode(joined.outputs)
    assert outputs.shape == (SESSIONS, STEPS, 454)
    for row in (0, 199, 201, SESSIONS - 1):
        np.testing.assert_allclose(outputs[row], offline(token_artifact, x[row]), atol=1e-5)


def test_the_client_joins_parts_whatever_its_receive_limit(wide: RunningServer, token_artifact: Path) -> None:
    x = _inputs(token_artifact)

    async def send(limit: int, prefix: str) -> pb.FrameResult:
        options = ClientOptions(max_message_bytes=limit)
        async with AsyncConveyorClient(f"127.0.0.1:{wide.port}", options) as client:
            return await client.frame(_frame(x, prefix))

    small = asyncio.run(send(GRPC_DEFAULT_RECEIVE_BYTES, "s"))
    large = asyncio.run(send(64 * 1024 * 1024, "l"))
    assert not small.errors and not large.errors
    np.testing.assert_array_equal(decode(small.outputs), decode(large.outputs))
    np.testing.assert_allclose(decode(small.outputs)[7], offline(token_artifact, x[7]), atol=1e-5)


def test_a_limit_below_one_sessions_result_is_refused_naming_the_remedy(
    wide: RunningServer, token_artifact: Path
) -> None:
    frame = _frame(_inputs(token_artifact)[:2], "tiny")
    frame.max_result_bytes = 1000  # one session's 32 x 454 outputs are 58 kB
    [answer] = _parts(wide, frame)
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "max_result_bytes 1000" in answer.error.message and "receive limit" in answer.error.message
    frame.max_result_bytes = -1
    [answer] = _parts(wide, frame)
    assert "max_result_bytes must be >= 0" in answer.error.message
    frame.max_result_bytes = 0
    [answer] = _parts(wide, frame)  # refused frames changed nothing: the sessions start now
    assert list(answer.result.steps) == [STEPS, STEPS]
