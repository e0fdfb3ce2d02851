"""A fuzzer of the request path, against real servers over real channels: no client input yields UNKNOWN or
INTERNAL (the codes that say the server is broken), every answer says what was wrong, a live session is left
as it was, and the server stays SERVING.

Hypothesis draws ChunkRequests at every value the wire allows (undefined enum numbers, negative and huge
shapes, sizes that disagree, any text, any offset, snapshots of junk), requests near the valid ones, and bytes
that are no protobuf message at all; they go to Step, EndSession, Snapshot and GetModelInfo, and on a Stream;
fuzzed frames (columns that agree or not, any ids and flags) go on a Frames stream.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fuzzing import fuzz_settings
from grpc_health.v1 import health_pb2
from hypothesis import example, given
from hypothesis import strategies as st
from serving_harness import RawStream, assert_continues, health_status, running, sequence, start_session

from serving.server.app import RunningServer
from serving.wire import pb, pb_grpc
from serving.wire.tensors import encode

pytestmark = pytest.mark.timeout(300)

BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
INT64 = st.integers(-(2**63), 2**63 - 1)
FUZZ = fuzz_settings(600)
RAW_METHODS = ("Step", "EndSession", "Snapshot", "GetModelInfo")

session_ids = st.one_of(
    st.text(max_size=150),
    st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    st.sampled_from(["", "anchor", "x" * 129]),
)
dtypes = st.one_of(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_INT64]), st.integers(-3, 9))
shapes = st.lists(st.one_of(st.integers(-3, 40), st.integers(-(2**62), 2**62)), max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Near-valid (data the size the shape says, values anything) or arbitrary tensors."""
    dtype, shape = draw(dtypes), draw(shapes)
    size = int(np.prod(shape)) * 8 if all(0 <= d <= 40 for d in shape) else 0
    # The size the shape says, where that is small (a draw of megabytes would slow every case), else any.
    exact = [st.binary(min_size=size, max_size=size)] if size <= 4096 else []
    data = draw(st.one_of(*exact, st.binary(max_size=200)))
    return _tensor(dtype, shape, data)


@st.composite
def valid_shaped(draw: st.DrawFn, feature_width: int) -> pb.Tensor:
    """Tensors of a shape and dtype the model takes, holding any values (NaN, huge ids, negative ids)."""
    steps = draw(st.integers(1, 8))
    if feature_width:
        values = draw(
            st.lists(st.floats(width=32), min_size=steps * feature_width, max_size=steps * feature_width)
        )
        return encode(np.array(values, np.float32).reshape(steps, feature_width))
    values = draw(st.lists(INT64, min_size=steps, max_size=steps))
    return encode(np.array(values, np.int64))


def chunk_requests(feature_width: int) -> st.SearchStrategy[pb.ChunkRequest]:
    return st.builds(
        pb.ChunkRequest,
        session_id=session_ids,
        inputs=st.one_of(tensors(), valid_shaped(feature_width)),
        offset=INT64,
        start=st.booleans(),
        end=st.booleans(),
        reset=st.booleans(),
        snapshot=st.one_of(st.just(b""), st.binary(max_size=120)),
        outputs=st.integers(-2, 5),
        request_id=st.text(max_size=20),
    )


def _tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DType.ValueType(dtype), shape=shape, data=data)


@pytest.fixture(scope="module", params=["token_artifact", "feature_artifact", "vad_artifact"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, Path, int]]:
    artifact: Path = request.getfixturevalue(request.param)
    width = 0 if request.param == "token_artifact" else int(sequence(artifact).shape[1])
    with running(artifact) as running_server:
        yield running_server, artifact, width


@pytest.fixture(scope="module")
def channel(server: tuple[RunningServer, Path, int]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server[0].port}") as opened:
        yield opened


def _assert_answer_is_sane(call: Any, request: Any) -> None:
    try:
        call(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() not in BROKEN, (error.code(), error.details(), request)
        details = str(error.details())
        assert details and "Traceback" not in details and "<class" not in details, details


def test_fuzzed_chunk_requests_never_break_the_server(
    server: tuple[RunningServer, Path, int], channel: grpc.Channel
) -> None:
    running_server, artifact, width = server
    stub = pb_grpc.ConveyorStub(channel)
    x = sequence(artifact, 6)
    start_session(stub, "anchor", x[:3])  # a live session that no fuzzed request may disturb

    @FUZZ
    @given(chunk_requests(width))
    # What the fuzzer found once, kept: a dtype number the proto does not define; no bytes with a dimension
    # no array can have.
    @example(pb.ChunkRequest(session_id="s", start=True, inputs=_tensor(77, [1], bytes(8))))
    @example(pb.ChunkRequest(session_id="s", start=True, inputs=_tensor(pb.DTYPE_FLOAT32, [0, 2**61], b"")))
    def step(request: pb.ChunkRequest) -> None:
        if request.session_id == "anchor":
            request.session_id = "not-the-anchor"
        _assert_answer_is_sane(stub.Step, request)

    step()
    assert_continues(stub, artifact, "anchor", x, 3)
    assert health_status(running_server) == health_pb2.HealthCheckResponse.SERVING


def test_bytes_that_are_no_message_are_invalid_argument(channel: grpc.Channel) -> None:
    @FUZZ
    @given(st.sampled_from(RAW_METHODS), st.binary(max_size=300))
    def raw(method: str, data: bytes) -> None:
        _assert_answer_is_sane(channel.unary_unary(f"/conveyor.v1.Conveyor/{method}"), data)

    raw()
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary("/conveyor.v1.Conveyor/Step")(b"\xff\xff\xff", timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid conveyor.v1.ChunkRequest message" in str(refused.value.details())


def test_a_stream_answers_every_fuzzed_message_in_band_and_stays_open(
    server: tuple[RunningServer, Path, int], channel: grpc.Channel
) -> None:
    """On one Stream: fuzzed requests and raw junk, each answered (chunk or in-band error, never a broken
    code), and a valid chunk after them still answered."""
    _, artifact, width = server
    send_raw = channel.stream_stream("/conveyor.v1.Conveyor/Stream")
    stream = RawStream(pb_grpc.ConveyorStub(channel))

    @fuzz_settings(200)
    @given(chunk_requests(width))
    def in_band(request: pb.ChunkRequest) -> None:
        answer = _answer(stream, request)
        if answer.HasField("error"):
            assert answer.error.code != grpc.StatusCode.OK.value[0] and answer.error.message, answer.error
            assert answer.error.code not in {code.value[0] for code in BROKEN}, answer.error

    in_band()
    x = sequence(artifact, 4)
    assert stream.call(pb.ChunkRequest(session_id="after-fuzz", inputs=encode(x), start=True)).HasField(
        "chunk"
    )
    stream.close()
    answers = list(send_raw(iter([b"\xff\xff", b"\x0a\x02\xc3\x28"]), timeout=10))
    assert len(answers) == 2
    for raw_answer in answers:
        answer = pb.StreamResponse.FromString(raw_answer)
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer


@st.composite
def frames(draw: st.DrawFn, feature_width: int) -> pb.Frame:
    """Frames of any columns (lengths that agree or not, any ids, offsets and flags) over near-valid or
    arbitrary tensors, including ones shaped [sessions, time, ...] as the model takes them."""
    ids = draw(st.lists(session_ids, max_size=6))
    steps = draw(st.integers(1, 4))
    shape = [len(ids), steps, *([feature_width] if feature_width else [])]
    values = draw(st.lists(st.floats(width=32) if feature_width else INT64, min_size=int(np.prod(shape)),
                           max_size=int(np.prod(shape))))  # fmt: skip
    shaped = encode(np.array(values, np.float32 if feature_width else np.int64).reshape(shape))
    column = st.lists(st.booleans(), max_size=7)
    return pb.Frame(
        frame_id=draw(st.text(max_size=10)),
        session_ids=ids,
        inputs=draw(st.one_of(st.just(shaped), tensors())),
        offsets=draw(st.lists(INT64, max_size=7)),
        start=draw(column),
        end=draw(column),
        reset=draw(column),
        outputs=pb.OutputMode.ValueType(draw(st.integers(-2, 5))),
        snapshots=draw(st.lists(st.binary(max_size=40), max_size=7)),
    )


def test_a_frames_stream_answers_every_fuzzed_frame_in_band_and_stays_open(
    server: tuple[RunningServer, Path, int], channel: grpc.Channel
) -> None:
    """On one Frames stream: fuzzed frames, each answered by a result (any session's error in band, never a
    broken code) or an in-band error; the anchor session is untouched, and raw junk gets INVALID_ARGUMENT."""
    running_server, artifact, width = server
    stub = pb_grpc.ConveyorStub(channel)
    x, anchor = sequence(artifact, 6), "frames-anchor"  # a session of its own: the module's server is shared
    start_session(stub, anchor, x[:3])
    requests: queue.Queue[pb.Frame | None] = queue.Queue()
    answers = stub.Frames(iter(requests.get, None))
    broken = {code.value[0] for code in BROKEN}

    @fuzz_settings(200)
    @given(frames(width))
    def in_band(frame: pb.Frame) -> None:
        frame.session_ids[:] = [sid if sid != anchor else "not-the-anchor" for sid in frame.session_ids]
        frame.frame_id = "fuzzed"
        requests.put(frame)
        while (answer := next(answers)).HasField("session_ended"):
            pass
        if answer.HasField("error"):
            assert answer.error.request_id == "fuzzed" and answer.error.message, answer.error
            assert answer.error.code not in broken, answer.error
            return
        assert len(answer.result.steps) == len(frame.session_ids)
        for error in answer.result.errors:
            assert error.code not in broken and error.message, (error, frame)

    in_band()
    requests.put(None)
    list(answers)
    assert_continues(stub, artifact, anchor, x, 3)
    assert health_status(running_server) == health_pb2.HealthCheckResponse.SERVING
    [raw] = channel.stream_stream("/conveyor.v1.Conveyor/Frames")(iter([b"\xff\xff"]), timeout=10)
    assert pb.FrameResponse.FromString(raw).error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _answer(stream: RawStream, request: pb.ChunkRequest) -> pb.StreamResponse:
    """The answer to `request`, past the notices of sessions that ended (a fuzzed chunk may end one)."""
    request.request_id = "fuzzed"
    stream.send(request)
    while (answer := stream.receive()).HasField("session_ended"):
        pass
    assert (answer.chunk if answer.HasField("chunk") else answer.error).request_id == "fuzzed"
    return answer


def test_oversized_messages_and_metadata_are_refused_naming_the_limit(channel: grpc.Channel) -> None:
    """Refused by gRPC itself before any handler runs: RESOURCE_EXHAUSTED, with the limit in the message."""
    step = channel.unary_unary("/conveyor.v1.Conveyor/Step")
    with pytest.raises(grpc.RpcError) as too_big:
        step(bytes(6 << 20), timeout=10)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max (6291456 vs. 4194304)" in str(too_big.value.details())
    with pytest.raises(grpc.RpcError) as too_much:
        step(b"", timeout=10, metadata=[("x-padding", "a" * 20000)])
    assert too_much.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds" in str(too_much.value.details())
