"""The Open Inference Protocol (KServe v2) with Triton's sequence extension, on a real server over a real
channel with the protocol's own stubs: health and metadata as a v2 client reads them; sequences in chunks over
ModelInfer and interleaved on one ModelStreamInfer stream, equal to one whole-sequence ONNX Runtime run;
sequence ids keyed on type and value; exactly-once with sequence_offset; each bad request its code; v2 and
native clients on the same sessions; a sequence outliving kill -9 of its replica (Redis, nginx).
tests/test_tritonclient.py drives the same with tritonclient itself."""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from local_services import ServerProcess, replicas_behind_nginx
from serving_harness import (
    assert_close,
    assert_error,
    infer,
    make_inputs,
    offline,
    rejected,
    running,
    v2_output,
)

from serving.client import ConveyorClient
from serving.client.core import ROUTE_HEADER
from serving.server.app import RunningServer
from serving.wire import oip, oip_grpc

pytestmark = pytest.mark.timeout(120)
MODEL = "language"


@pytest.fixture(scope="module")
def server(token_artifact: Path) -> Iterator[RunningServer]:
    with running(token_artifact, max_batch_size=64) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def cuts(length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    bounds = [0, *sorted(rng.choice(np.arange(1, length), size=min(3, length - 1), replace=False)), length]
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def test_a_v2_client_sees_a_live_ready_sequence_model(
    stub: oip_grpc.GRPCInferenceServiceStub, server: RunningServer
) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL)).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "conveyor" and list(metadata.extensions) == ["sequence", "model_configuration"]
    model = stub.ModelMetadata(oip.ModelMetadataRequest(name=MODEL, version="1"))
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "INT64", [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("y", "FP32", [-1, -1, 454])]
    config = stub.ModelConfig(oip.ModelConfigRequest(name=MODEL)).config
    assert config.max_batch_size == 1 and config.HasField("sequence_batching")
    assert config.sequence_batching.max_sequence_idle_microseconds == 600 * 10**6
    assert not config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["x"] and [o.name for o in config.output] == ["y"]
    for call, request in (
        (stub.ModelMetadata, oip.ModelMetadataRequest(name="other")),
        (stub.ModelConfig, oip.ModelConfigRequest(name=MODEL, version="2")),
    ):
        assert_error(
            rejected(call, request), grpc.StatusCode.NOT_FOUND, r"is not served here: this server serves"
        )


def test_sequences_over_model_infer_equal_whole_runs_keyed_on_type_and_value(
    stub: oip_grpc.GRPCInferenceServiceStub, token_artifact: Path
) -> None:
    rng = np.random.default_rng(3)
    sequences: dict[int | str, np.ndarray] = {
        5: make_inputs(token_artifact, 17, rng),
        "5": make_inputs(token_artifact, 11, rng),
    }
    pieces: dict[int | str, list[np.ndarray]] = {key: [] for key in sequences}
    plans = {key: cuts(len(x), rng) for key, x in sequences.items()}
    for step in range(max(map(len, plans.values()))):  # the two sequences interleaved
        for key, plan in plans.items():
            if step < len(plan):
                a, b = plan[step]
                x = sequences[key][a:b]
                response = stub.ModelInfer(
                    infer(x, key, start=step == 0, end=step == len(plan) - 1, request_id=f"{key}-{step}")
                )
                assert response.id == f"{key}-{step}"
                assert response.parameters["sequence_steps"].int64_param == b
                pieces[key].append(v2_output(response))
    for key, x in sequences.items():
        assert_close(np.concatenate(pieces[key]), offline(token_artifact, x))


def test_64_sequences_interleaved_on_one_stream(
    stub: oip_grpc.GRPCInferenceServiceStub, token_artifact: Path
) -> None:
    rng = np.random.default_rng(4)
    sequences = {f"stream-{i}": make_inputs(token_artifact, int(rng.integers(2, 30)), rng) for i in range(64)}
    plans = {key: cuts(len(x), rng) for key, x in sequences.items()}
    requests: list[oip.ModelInferRequest] = []
    for step in range(max(map(len, plans.values()))):
        for key, plan in plans.items():
            if step < len(plan):
                a, b = plan[step]
                last = step == len(plan) - 1
                requests.append(
                    infer(sequences[key][a:b], key, start=step == 0, end=last, request_id=f"{key}/{step}")
                )
    answers = {}
    for response in stub.ModelStreamInfer(iter(requests)):
        assert not response.error_message, response.error_message
        answers[response.infer_response.id] = v2_output(response.infer_response)
    assert len(answers) == len(requests)
    for key, x in sequences.items():
        streamed = np.concatenate([answers[f"{key}/{step}"] for step in range(len(plans[key]))])
        assert_close(streamed, offline(token_artifact, x))


def test_errors_on_a_stream_are_in_band_with_the_request_id_and_the_stream_goes_on(
    stub: oip_grpc.GRPCInferenceServiceStub, token_artifact: Path
) -> None:
    x = make_inputs(token_artifact, 6, np.random.default_rng(5))
    requests: queue.Queue[oip.ModelInferRequest | None] = queue.Queue()
    responses = stub.ModelStreamInfer(iter(requests.get, None))
    requests.put(infer(x, 9001, request_id="no-start"))
    failed = next(responses)
    assert failed.infer_response.id == "no-start"
    assert "must specify the sequence_start flag" in failed.error_message
    requests.put(infer(x, 9001, start=True, end=True, request_id="then-ok"))
    answered = next(responses)
    assert not answered.error_message and answered.infer_response.id == "then-ok"
    assert_close(v2_output(answered.infer_response), offline(token_artifact, x))
    requests.put(None)
    assert list(responses) == []


def test_sequence_offset_makes_a_retry_exactly_once(
    stub: oip_grpc.GRPCInferenceServiceStub, token_artifact: Path
) -> None:
    x = make_inputs(token_artifact, 9, np.random.default_rng(6))
    stub.ModelInfer(infer(x[:4], "retried", start=True, offset=0))
    first = stub.ModelInfer(infer(x[4:7], "retried", offset=4))
    again = stub.ModelInfer(infer(x[4:7], "retried", offset=4))  # its answer was lost: sent again
    assert again.parameters["sequence_steps"].int64_param == 7
    assert np.array_equal(v2_output(first), v2_output(again))
    gap = rejected(stub.ModelInfer, infer(x[7:], "retried", offset=8))
    assert_error(
        gap,
        grpc.StatusCode.ABORTED,
        r"has consumed 7 steps but the chunk's offset is 8: resend from offset 7",
    )
    last = stub.ModelInfer(infer(x[7:], "retried", offset=7, end=True))
    assert_close(v2_output(last), offline(token_artifact, x)[7:])
    # Without the offset a request resent is applied again: at-least-once, as Triton's sequences are.
    stub.ModelInfer(infer(x[:4], "appended", start=True))
    stub.ModelInfer(infer(x[4:7], "appended"))
    twice = stub.ModelInfer(infer(x[4:7], "appended"))
    assert twice.parameters["sequence_steps"].int64_param == 10


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda r: r.parameters.pop("sequence_id"), "INVALID_ARGUMENT", r"needs a sequence_id parameter"),
        (
            lambda r: setattr(r.parameters["sequence_id"], "int64_param", 0),
            "INVALID_ARGUMENT",
            r"sequence_id 0 and the empty string",
        ),
        (
            lambda r: setattr(r.parameters["sequence_id"], "string_param", "a b"),
            "INVALID_ARGUMENT",
            r"string sequence_id 'a b' is invalid",
        ),
        (
            lambda r: setattr(r.parameters["sequence_start"], "int64_param", 1),
            "INVALID_ARGUMENT",
            r"sequence_start must be a bool",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP32"),
            "INVALID_ARGUMENT",
            r"input 'x' is FP32: the model takes INT64",
        ),
        (
            lambda r: r.inputs[0].shape.__setitem__(0, 2),
            "INVALID_ARGUMENT",
            r"has shape \[2, 3\]: the model takes \[1, -1\]",
        ),
        (
            lambda r: setattr(r.inputs[0], "name", "tokens"),
            "INVALID_ARGUMENT",
            r"inputs are \['tokens'\]: the model takes one, 'x'",
        ),
        (
            lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 16),
            "INVALID_ARGUMENT",
            r"holds 2 values for shape \[1, 3\]",
        ),
        (
            lambda r: r.outputs.add(name="probabilities"),
            "INVALID_ARGUMENT",
            r"unknown output 'probabilities'",
        ),
        (lambda r: setattr(r, "model_name", "other"), "NOT_FOUND", r"model 'other' is not served here"),
        (
            lambda r: setattr(r, "model_version", "7"),
            "NOT_FOUND",
            r"model 'language' version '7' is not served",
        ),
    ],
    ids=[
        "no id",
        "id 0",
        "bad string id",
        "start not bool",
        "dtype",
        "batch 2",
        "input name",
        "data size",
        "output name",
        "unknown model",
        "unknown version",
    ],
)
def test_bad_requests_get_their_code(
    stub: oip_grpc.GRPCInferenceServiceStub,
    mutate: Callable[[oip.ModelInferRequest], object],
    code: str,
    message: str,
) -> None:
    request = infer(np.array([1, 2, 3]), "bad-requests", start=True)
    mutate(request)
    assert_error(rejected(stub.ModelInfer, request), grpc.StatusCode[code], message)


def test_v2_and_native_clients_share_sessions(
    stub: oip_grpc.GRPCInferenceServiceStub, server: RunningServer, token_artifact: Path
) -> None:
    x = make_inputs(token_artifact, 10, np.random.default_rng(7))
    first = stub.ModelInfer(infer(x[:6], 77, start=True))
    with ConveyorClient(f"127.0.0.1:{server.port}") as client:
        native = client.attach("v2.i.77", offset=6).send(x[6:], end=True)
    assert_close(np.concatenate([v2_output(first), native]), offline(token_artifact, x))


def test_unserved_rpcs_are_unimplemented(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        statistics = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        with pytest.raises(grpc.RpcError) as raised:
            statistics(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_v2_sequence_outlives_kill_9_of_its_replica(token_artifact: Path, tmp_path: Path) -> None:
    """Two replicas on one Redis behind nginx, the sequence routed by x-conveyor-route: kill -9 of the replica
    holding it mid-sequence; the client retries the failed request with the same sequence_offset, the other
    replica answers from Redis, and the outputs equal the whole run."""
    x = make_inputs(token_artifact, 40, np.random.default_rng(8))
    with (
        replicas_behind_nginx(token_artifact, tmp_path, fail_timeout_s=1) as (one, two, proxy_port),
        grpc.insecure_channel(f"127.0.0.1:{proxy_port}") as channel,
    ):
        routed = oip_grpc.GRPCInferenceServiceStub(channel)
        pieces = []
        for offset in range(0, len(x), 4):
            if offset == 20:
                max((one, two), key=ServerProcess.chunks_answered).kill()
            request = infer(x[offset : offset + 4], 31337, start=offset == 0, offset=offset)
            pieces.append(v2_output(_with_retries(routed, request)))
        assert one.process is None or two.process is None
    assert_close(np.concatenate(pieces), offline(token_artifact, x))


def _with_retries(
    stub: oip_grpc.GRPCInferenceServiceStub, request: oip.ModelInferRequest
) -> oip.ModelInferResponse:
    """`ModelInfer`, resent while the replica behind the proxy is gone (UNAVAILABLE)."""
    for _ in range(60):
        try:
            response: oip.ModelInferResponse = stub.ModelInfer(
                request, timeout=10, metadata=((ROUTE_HEADER, "sequence-31337"),)
            )
            return response
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.1)
    raise AssertionError("no replica answered")
