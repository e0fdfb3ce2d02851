"""The Frames RPC against a real server: many sessions' chunks per message, columnar, under the Stream's
contract session by session (offsets, exactly-once replay, start/end/reset, snapshots, codes, notices), one
bad session never failing its neighbours, and frames mixed with Stream chunks for the same sessions."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import (
    assert_close,
    chunk,
    connect,
    make_inputs,
    offline,
    outputs,
    random_cuts,
    running,
)

from serving.client import AsyncConveyorClient, ConveyorError
from serving.client.frames import pack
from serving.server.app import RunningServer
from serving.wire import pb, pb_grpc
from serving.wire.tensors import decode

pytestmark = pytest.mark.timeout(60)
Served = tuple[Path, RunningServer]


@pytest.fixture(scope="module", params=["token_artifact", "feature_artifact", "gru_artifact"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    artifact: Path = request.getfixturevalue(request.param)
    with running(artifact, max_batch_size=64) as server:
        yield artifact, server


class FrameStream:
    """A Frames call driven one frame at a time from test code."""

    def __init__(self, stub: pb_grpc.ConveyorStub) -> None:
        self._requests: queue.Queue[pb.Frame | None] = queue.Queue()
        self._responses = stub.Frames(iter(self._requests.get, None))
        self.notices: list[pb.SessionEnded] = []

    def call(self, frame: pb.Frame) -> pb.FrameResponse:
        """Send a frame and return its answer (a result or an error); notices meanwhile go to `notices`."""
        self._requests.put(frame)
        while (response := self.receive()).WhichOneof("kind") == "session_ended":
            self.notices.append(response.session_ended)
        return response

    def receive(self) -> pb.FrameResponse:
        response: pb.FrameResponse = next(self._responses)
        return response

    def close(self) -> list[pb.FrameResponse]:
        self._requests.put(None)
        return list(self._responses)


def _frame(rows: list[tuple[str, np.ndarray, int]], **columns: list[bool] | list[bytes]) -> pb.Frame:
    """A frame of (session id, inputs, offset) rows of one length, and any flag columns."""
    return pack([chunk(sid, x, offset, **_row(columns, i)) for i, (sid, x, offset) in enumerate(rows)], "f")


def _row(columns: dict[str, list[bool] | list[bytes]], index: int) -> dict[str, bool | bytes]:
    """One row's ChunkRequest fields of the frame's columns (column `snapshots`: field `snapshot`)."""
    return {name.removesuffix("s"): values[index] for name, values in columns.items()}


def test_sessions_streamed_in_random_frames_mixed_with_stream_chunks_match_each_alone(served: Served) -> None:
    """Gateway code on the asyncio client: each session sends its chunks, cut at random, mostly packed into
    frames, every third on the plain Stream; what a loop pass submits leaves as frames of one chunk length."""
    artifact, server = served
    rng = np.random.default_rng(11)
    sequences = {f"mix-{i}": make_inputs(artifact, int(rng.integers(10, 50)), rng) for i in range(24)}
    plans = {sid: random_cuts(len(x), rng, most=4) for sid, x in sequences.items()}

    async def one(client: AsyncConveyorClient, sid: str) -> np.ndarray:
        parts = []
        for number, (a, b) in enumerate(plans[sid]):
            send = client.stream_chunk if number % 3 == 2 else client.frame_chunk
            parts.append(outputs(await send(chunk(sid, sequences[sid][a:b], a, start=a == 0))))
        return np.concatenate(parts)

    async def with_a_session(client: AsyncConveyorClient, x: np.ndarray) -> np.ndarray:
        async with client.session(via="frames") as session:  # the session API, every chunk in a frame
            return np.concatenate([await session.send(x[a:b]) for a, b in random_cuts(len(x), rng)])

    async def main() -> tuple[list[np.ndarray], np.ndarray]:
        async with AsyncConveyorClient(f"127.0.0.1:{server.port}") as client:
            mixed = await asyncio.gather(*(one(client, sid) for sid in sequences))
            return mixed, await with_a_session(client, sequences["mix-0"])

    mixed, framed = asyncio.run(main())
    for x, got in zip(sequences.values(), mixed, strict=True):
        assert_close(got, offline(artifact, x))
    assert_close(framed, offline(artifact, sequences["mix-0"]))


def test_a_chunk_whose_tensor_does_not_parse_never_shares_a_frame(served: Served) -> None:
    """The client's packer: a chunk with fewer bytes than its shape says would make its whole frame's tensor
    unreadable; it leaves in a frame of its own, and the chunks submitted with it are answered."""
    artifact, server = served
    x = make_inputs(artifact, 3, np.random.default_rng(12))
    good = [chunk(f"near-{i}", x, 0, start=True) for i in range(3)]
    short = chunk("short", x, 0, start=True)
    short.inputs.data = short.inputs.data[:-1]

    async def main() -> list[pb.ChunkResponse | BaseException]:
        async with AsyncConveyorClient(f"127.0.0.1:{server.port}") as client:
            sends = [client.frame_chunk(request) for request in (good[0], short, *good[1:])]
            return await asyncio.gather(*sends, return_exceptions=True)

    first, refused, *rest = asyncio.run(main())
    assert isinstance(refused, ConveyorError) and refused.code == grpc.StatusCode.INVALID_ARGUMENT
    for answer in (first, *rest):
        assert isinstance(answer, pb.ChunkResponse) and answer.steps == len(x)
        assert_close(outputs(answer), offline(artifact, x))


def test_one_bad_session_fails_alone_and_its_state_is_untouched(served: Served) -> None:
    artifact, server = served
    x = make_inputs(artifact, 6, np.random.default_rng(1))
    with connect(server) as stub:
        frames = FrameStream(stub)
        started = frames.call(_frame([("ok", x[:3], 0), ("bad", x[:3], 0)], start=[True, True])).result
        assert list(started.steps) == [3, 3] and not started.errors
        result = frames.call(_frame([("ok", x[3:], 3), ("bad", x[3:], 5)])).result  # bad: offset 5, not 3
        assert list(result.steps) == [6, -1]
        [error] = result.errors
        assert (error.index, error.code) == (1, grpc.StatusCode.ABORTED.value[0])
        assert "offset is 5: resend from offset 3" in error.message
        assert_close(decode(result.outputs)[0], offline(artifact, x)[3:])
        assert not decode(result.outputs)[1].any()  # a failed session's rows are zeros
        retried = frames.call(_frame([("bad", x[3:], 3)])).result  # the right offset: as if nothing happened
        assert list(retried.steps) == [6]
        assert_close(decode(retried.outputs)[0], offline(artifact, x)[3:])
        assert frames.close() == []


def test_a_repeated_frame_is_answered_again_not_applied_twice(served: Served) -> None:
    artifact, server = served
    x = make_inputs(artifact, 8, np.random.default_rng(2))
    with connect(server) as stub:
        frames = FrameStream(stub)
        first = _frame([("r1", x[:4], 0), ("r2", x[:4], 0)], start=[True, True])
        applied = frames.call(first).result
        again = frames.call(first).result
        assert list(again.replayed) == [True, True] and list(again.steps) == [4, 4]
        assert decode(again.outputs).tobytes() == decode(applied.outputs).tobytes()
        last = frames.call(_frame([("r1", x[4:], 4), ("r2", x[4:], 4)], end=[True, True])).result
        assert list(last.ended) == [True, True]
        assert frames.call(_frame([("r1", x[4:], 4)], end=[True])).result.replayed[0]  # ended, still replayed
        assert sorted(notice.session_id for notice in frames.notices) == ["r1", "r2"]
        frames.close()
    assert_close(np.concatenate([decode(applied.outputs)[0], decode(last.outputs)[0]]), offline(artifact, x))


def test_start_reset_snapshot_and_server_issued_ids_in_frames(served: Served) -> None:
    artifact, server = served
    x = make_inputs(artifact, 6, np.random.default_rng(3))
    with connect(server) as stub:
        frames = FrameStream(stub)
        frames.call(_frame([("snap", x[:2], 0)], start=[True]))
        blob = stub.Snapshot(pb.SnapshotRequest(session_id="snap"), timeout=5).snapshot
        frame = _frame(
            [("", x[:2], 0), ("snap", x[:2], 0), ("restored", x[2:4], 2)],
            start=[True, True, True],
            reset=[False, True, False],
            snapshots=[b"", b"", blob],
        )
        result = frames.call(frame).result
        assert not result.errors, result.errors
        issued, _, _ = result.session_ids
        assert issued and list(result.steps) == [2, 2, 4]
        expected = offline(artifact, x)
        got = decode(result.outputs)
        assert_close(got[0], expected[:2])  # a fresh session
        assert_close(got[1], expected[:2])  # reset: from zero again
        assert_close(got[2], expected[2:4])  # restored at step 2
        duplicate = frames.call(_frame([("snap", x[2:4], 2), ("snap", x[2:4], 2)])).result
        assert [error.index for error in duplicate.errors] == [1]
        assert "appears more than once" in duplicate.errors[0].message
        frames.close()


def test_a_frame_that_does_not_parse_is_refused_in_band_and_the_stream_goes_on(served: Served) -> None:
    artifact, server = served
    x = make_inputs(artifact, 4, np.random.default_rng(4))
    with connect(server) as stub:
        frames = FrameStream(stub)
        mismatched = _frame([("p", x[:2], 0), ("q", x[:2], 0)])
        del mismatched.offsets[1:]  # one offset for two sessions
        refused = frames.call(mismatched)
        assert refused.WhichOneof("kind") == "error"
        assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert (
            refused.error.request_id == "f"
            and "offsets has 1 entries for 2 sessions" in refused.error.message
        )
        empty = frames.call(pb.Frame(frame_id="e"))
        assert "carries no session" in empty.error.message
        fine = frames.call(_frame([("p", x[:2], 0)], start=[True]))
        assert fine.WhichOneof("kind") == "result" and list(fine.result.steps) == [2]
        frames.close()


def test_sessions_used_on_a_frames_stream_are_told_when_they_end(served: Served) -> None:
    artifact, server = served
    x = make_inputs(artifact, 2, np.random.default_rng(5))
    with connect(server) as stub:
        frames = FrameStream(stub)
        frames.call(_frame([("told", x, 0)], start=[True]))
        stub.EndSession(pb.EndSessionRequest(session_id="told"), timeout=5)
        notice = frames.receive()
        assert notice.WhichOneof("kind") == "session_ended"
        assert (notice.session_ended.session_id, notice.session_ended.reason) == ("told", pb.END_REASON_END)
        frames.close()


def test_malformed_frame_bytes_get_an_in_band_error(served: Served) -> None:
    _, server = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream("/conveyor.v1.Conveyor/Frames")
        [response] = call(iter([b"\xff\xff\xff"]), timeout=10)
    answer = pb.FrameResponse.FromString(response)
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid conveyor.v1.Frame message" in answer.error.message
