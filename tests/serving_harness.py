"""Shared by the server tests: a real server on free ports, raw gRPC stubs, and the offline reference run.

Raw stubs on purpose: these tests pin the wire contract itself, independently of `serving.client`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import queue
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from modelcard import spec_from_card
from modelcard.adopt import Described, Naming, adopt
from modelcard.framing import Framing
from modelcard.graph import Graph
from serving.client.scrape import scrape as scrape_url
from serving.domain.runner import StepRunner
from serving.server.app import RunningServer, build_server
from serving.server.config import ServerConfig
from serving.wire import oip, pb, pb_grpc
from serving.wire.tensors import decode, encode

TOLERANCE = 1e-5


@contextmanager
def running(
    artifact: Path,
    *,
    runner: StepRunner | None = None,
    clock: Callable[[], float] | None = None,
    **overrides: Any,
) -> Iterator[RunningServer]:
    """A server for `artifact` on free ports with a fresh registry, stopped on exit."""
    config = ServerConfig(model_dir=artifact, port=0, metrics_port=0, grace_s=5.0, **overrides)
    with build_server(config, CollectorRegistry(), runner=runner, clock=clock) as server:
        yield server


@contextmanager
def connect(server: RunningServer) -> Iterator[pb_grpc.ConveyorStub]:
    """A fresh channel (a new connection) to `server`, closed on exit."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ConveyorStub(channel)


def health_status(server: RunningServer, service: str = "") -> int:
    """The health service's answer for `service` ("" is the whole server)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def scrape(server: RunningServer) -> tuple[str, dict[str, float]]:
    """GET /metrics: the exposition text, and every sample as `name{labels}` -> value."""
    metrics = scrape_url(f"http://127.0.0.1:{server.metrics_port}/metrics")
    return metrics.text, metrics.by_key()


def of_version(metric: str, model: str = "language", version: str = "1", **labels: str) -> str:
    """The key `scrape` gives a sample of one model version's metric (labels sorted, as it sorts them)."""
    named = {"model": model, "version": version, **labels}
    return metric + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(named.items())) + "}"


def card(artifact: Path) -> dict[str, Any]:
    """The artifact's model.json (read afresh: a test may rewrite it)."""
    return dict(json.loads((artifact / "model.json").read_text()))


def make_inputs(artifact: Path, steps: int, rng: np.random.Generator) -> np.ndarray:
    """A random valid sequence for the artifact's model: int64 [steps] or float32 [steps, features] (a framed
    model: `steps` windows of samples and half a window more, [samples, 1])."""
    described = card(artifact)
    spec = described["input"]
    if spec["kind"] == "tokens":
        return rng.integers(0, spec["size"], steps, dtype=np.int64)
    if described.get("framing"):
        steps = steps * described["framing"]["window"] + described["framing"]["window"] // 2
    return rng.standard_normal((steps, spec["size"])).astype(np.float32)


def offline(artifact: Path, x: np.ndarray) -> np.ndarray:
    """Outputs [time, outputs] of the whole sequence in one ONNX Runtime run from zero state (a framed model:
    its windows, [windows, outputs])."""
    spec = spec_from_card(card(artifact))
    graph = Graph(_reference(artifact), spec)
    if spec.framing is not None:
        y, *_ = graph.run_framed(x[None, :, 0], spec.layout.zeros(1), [])
    else:
        y, *_ = graph.run(x[None], spec.layout.zeros(1))
    return np.asarray(y[0])


SILERO_DATA = (
    importlib.resources.files("silero_vad") / "data" if importlib.util.find_spec("silero_vad") else None
)
SILERO_FRAMING = {16000: Framing(512, 64), 8000: Framing(256, 32)}


def card_silero(out: Path, rate: int = 16000, name: str = "silero_vad.onnx", constant: bool = True) -> Path:
    """The artifact `conveyor card ONNX --constant sr=RATE --window W --context C --state state:stateN` writes
    for one of the silero-vad wheel's graphs (a dev dependency)."""
    assert SILERO_DATA is not None, "the silero-vad wheel is not installed"
    constants = (("sr", str(rate)),) if constant else ()
    naming = Naming(states=(("state", "stateN"),), constants=constants, framing=SILERO_FRAMING[rate])
    described = Described(out.name, "vad", None, "speech probability", ("speech",))
    adopt(Path(str(SILERO_DATA / name)), out, naming, described)
    return out


@functools.cache
def _reference(artifact: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])


def random_cuts(length: int, rng: np.random.Generator, most: int = 7) -> list[tuple[int, int]]:
    """Split [0, length) into consecutive (start, stop) pieces of 1..most steps."""
    pieces, start = [], 0
    while start < length:
        stop = min(length, start + int(rng.integers(1, most + 1)))
        pieces.append((start, stop))
        start = stop
    return pieces


def chunk(session_id: str, x: np.ndarray, offset: int, **fields: Any) -> pb.ChunkRequest:
    """A ChunkRequest carrying `x`."""
    return pb.ChunkRequest(session_id=session_id, inputs=encode(x), offset=offset, **fields)


def outputs(response: pb.ChunkResponse) -> np.ndarray:
    """A response's outputs as an array."""
    return decode(response.outputs)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shapes and max abs difference within TOLERANCE."""
    assert actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) <= TOLERANCE


def sequence(artifact: Path, steps: int = 12, seed: int = 0) -> np.ndarray:
    """A fixed random valid sequence for the artifact's model."""
    return make_inputs(artifact, steps, np.random.default_rng(seed))


def start_session(stub: pb_grpc.ConveyorStub, session_id: str, x: np.ndarray) -> pb.ChunkResponse:
    """Start `session_id` with `x` over a unary Step."""
    response: pb.ChunkResponse = stub.Step(chunk(session_id, x, 0, start=True), timeout=10)
    return response


def assert_continues(
    stub: pb_grpc.ConveyorStub, artifact: Path, session_id: str, x: np.ndarray, at: int
) -> None:
    """The session is exactly at step `at` of `x`: the rest of `x` gives the offline outputs."""
    response = stub.Step(chunk(session_id, x[at:], at), timeout=10)
    assert response.steps == len(x)
    framing = card(artifact).get("framing")
    # The outputs before step `at`: a framed model's are its windows.
    answered = at // framing["window"] if framing else at
    assert_close(outputs(response), offline(artifact, x)[answered:])


def assert_error(error: grpc.RpcError, code: grpc.StatusCode, pattern: str) -> None:
    """The error has `code` and a message matching `pattern`."""
    assert error.code() == code, error
    assert re.search(pattern, str(error.details())), error.details()


def infer(
    x: np.ndarray,
    sequence: int | str,
    *,
    start: bool = False,
    end: bool = False,
    request_id: str = "",
    offset: int | None = None,
    model: str = "language",
    version: str = "",
) -> oip.ModelInferRequest:
    """A v2 request carrying token ids `x` of `sequence`, as tritonclient builds one."""
    request = oip.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    if isinstance(sequence, str):
        request.parameters["sequence_id"].string_param = sequence
    else:
        request.parameters["sequence_id"].int64_param = sequence
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    if offset is not None:
        request.parameters["sequence_offset"].int64_param = offset
    request.inputs.add(name="x", datatype="INT64", shape=[1, len(x)])
    request.raw_input_contents.append(x.astype("<i8").tobytes())
    return request


def v2_output(response: oip.ModelInferResponse) -> np.ndarray:
    """The response's y, [time, outputs]."""
    (tensor,) = response.outputs
    assert tensor.name == "y" and tensor.datatype == "FP32" and tensor.shape[0] == 1
    values: np.ndarray = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tensor.shape)[0]
    return values


class RawStream:
    """A Stream call driven one message at a time from test code (requests go through a queue)."""

    def __init__(self, stub: pb_grpc.ConveyorStub) -> None:
        self._requests: queue.Queue[pb.ChunkRequest | None] = queue.Queue()
        self._responses = stub.Stream(iter(self._requests.get, None))

    def send(self, request: pb.ChunkRequest) -> None:
        """Send one request without waiting."""
        self._requests.put(request)

    def receive(self) -> pb.StreamResponse:
        """The next message from the server (a chunk, an error or a notice)."""
        response: pb.StreamResponse = next(self._responses)
        return response

    def call(self, request: pb.ChunkRequest) -> pb.StreamResponse:
        """Send a request and return the next message."""
        self.send(request)
        return self.receive()

    def close(self) -> list[pb.StreamResponse]:
        """Half-close, and return what the server still sends before it ends the stream."""
        self._requests.put(None)
        return list(self._responses)


def rejected(call: Callable[..., Any], request: Any) -> grpc.RpcError:
    """The error a unary call fails with (the test fails if it succeeds)."""
    try:
        call(request, timeout=10)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"expected the call to fail: {request}")
