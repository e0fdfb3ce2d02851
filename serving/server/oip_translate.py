"""The Open Inference Protocol (KServe v2, with Triton's sequence extension) <-> the domain.

A sequence is a Conveyor session. Its id is the request's `sequence_id` parameter, keyed on type and value
(int64 5, uint64 5 and string "5" are three sequences): the session id `v2.i.5`, `v2.u.5`, `v2.s.5`, within
the caller's tenant. `sequence_start` starts it (restarting a live one, as Triton does), `sequence_end` ends
it with that request. The protocol has no offsets, so a request is applied at the sequence's step count and a
retried request is applied again; a client that wants exactly-once sends the optional `sequence_offset`
(int64: the steps it has sent before this request) and gets Conveyor's own contract: a retry is answered from
the replay, a gap or overlap is refused with the server's count. Each response carries `sequence_steps`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.metadata import version

import grpc
import numpy as np

from modelcard import ModelSpec
from serving.domain.chunks import Chunk, ChunkResult, ServedModel
from serving.domain.errors import InvalidChunkError, SessionNotFoundError
from serving.domain.models import Version
from serving.domain.sessions.store import EndReason, SessionEnd
from serving.server.translate import status_for
from serving.wire import oip

SERVER_NAME = "conveyor"
# "sequence": sequence_id/start/end; "model_configuration": ModelConfig. No statistics, repository control
# or shared memory: those RPCs answer UNIMPLEMENTED.
EXTENSIONS = ("sequence", "model_configuration")
PLATFORM = "onnxruntime_onnx"
_DATATYPES = {"tokens": ("INT64", oip.TYPE_INT64, "<i8"), "features": ("FP32", oip.TYPE_FP32, "<f4")}
_STRING_ID = re.compile(r"[A-Za-z0-9._:-]{1,120}")
_KINDS = {"int64_param": "i", "uint64_param": "u", "string_param": "s"}


def sequence_start(request: oip.ModelInferRequest) -> bool:
    """Whether the request starts its sequence (`InvalidChunkError` when its flag is no bool)."""
    return _flag(request.parameters, "sequence_start")


def chunk_from_infer(request: oip.ModelInferRequest, model: ServedModel, namespace: str = "") -> Chunk:
    """The domain chunk of one sequence request to `model` (the version it was routed to);
    `InvalidChunkError` when it is not one."""
    spec = model.spec
    parameters = request.parameters
    offset = _int(parameters, "sequence_offset")
    start, end = _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end")
    for output in request.outputs:
        if output.name != spec.output_name:
            raise InvalidChunkError(
                f"unknown output {output.name!r}: the model's output is {spec.output_name!r}"
            )
    return Chunk(
        session_id=sequence_key(parameters),
        inputs=_inputs(request, spec),
        offset=0 if offset is None else offset,
        start=start,
        end=end,
        reset=start,  # a start on a live sequence restarts it, as in Triton
        namespace=namespace,
        append=offset is None,
    )


def sequence_key(parameters: Mapping[str, oip.InferParameter]) -> str:
    """The session id of the request's `sequence_id` parameter."""
    parameter = _parameter(parameters, "sequence_id")
    kind = parameter.WhichOneof("parameter_choice") if parameter is not None else None
    if parameter is None or kind not in _KINDS:
        raise InvalidChunkError(
            "the model is stateful: every request needs a sequence_id parameter (int64, uint64 or string)"
        )
    value = getattr(parameter, kind)
    if not value:
        raise InvalidChunkError("sequence_id 0 and the empty string name no sequence: use another id")
    if kind == "string_param" and not _STRING_ID.fullmatch(value):
        raise InvalidChunkError(
            f"string sequence_id {value[:140]!r} is invalid: use 1-120 characters of A-Z a-z 0-9 . _ : -"
        )
    return f"v2.{_KINDS[kind]}.{value}"


def shown_id(session_id: str) -> str:
    """The sequence id as its client wrote it (of a session id `sequence_key` made)."""
    _, kind, value = session_id.split(".", 2) if session_id.startswith("v2.") else ("", "s", session_id)
    return repr(value) if kind == "s" else value


def infer_response(
    request: oip.ModelInferRequest, result: ChunkResult, version: Version
) -> oip.ModelInferResponse:
    """The response to `request`: its id, the output FP32 [1, time, outputs] (raw) of the `version` it ran
    on, the steps."""
    spec = version.served.model.spec
    outputs = result.outputs
    response = oip.ModelInferResponse(
        model_name=version.name, model_version=str(version.number), id=request.id
    )
    response.outputs.add(name=spec.output_name, datatype="FP32", shape=[1, *outputs.shape])
    response.raw_output_contents.append(outputs.astype("<f4", copy=False).tobytes())
    response.parameters["sequence_steps"].int64_param = result.steps
    return response


def status_of(error: Exception, request: oip.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    """The status and message a v2 client gets for `error`: a sequence that is not live, without start, is
    INVALID_ARGUMENT in Triton's sense; the rest as Conveyor's own protocol has them."""
    if isinstance(error, SessionNotFoundError):
        sequence = shown_id(sequence_key(request.parameters))
        return grpc.StatusCode.INVALID_ARGUMENT, (
            f"inference request for sequence {sequence} to model {request.model_name!r} must specify the "
            "sequence_start flag on the sequence's first request (the sequence never started, ended, or "
            "was idle past the model's max_sequence_idle_microseconds)"
        )
    return status_for(error)


def end_notice(ended: SessionEnd) -> oip.ModelStreamInferResponse | None:
    """What a ModelStreamInfer stream is told when a sequence it used ends other than by its sequence_end
    (idle past the TTL, capacity, lifetime, shutdown): an in-band error naming it, no request's id."""
    if ended.reason is EndReason.END:
        return None
    return oip.ModelStreamInferResponse(
        error_message=f"sequence {shown_id(ended.session_id)} ended by the server ({ended.reason.value}) "
        f"after {ended.steps} steps: start it again with sequence_start"
    )


def server_metadata() -> oip.ServerMetadataResponse:
    """The server's name, version and protocol extensions."""
    return oip.ServerMetadataResponse(name=SERVER_NAME, version=version("conveyor"), extensions=EXTENSIONS)


def model_metadata(spec: ModelSpec, versions: list[int]) -> oip.ModelMetadataResponse:
    """The model's input and output, batch first (-1: variable), without the state tensors; its live
    `versions`."""
    response = oip.ModelMetadataResponse(
        name=spec.name, versions=[str(number) for number in versions], platform=PLATFORM
    )
    datatype = _DATATYPES[spec.input_kind][0]
    response.inputs.add(name=spec.input_name, datatype=datatype, shape=[-1, *_input_dims(spec)])
    response.outputs.add(name=spec.output_name, datatype="FP32", shape=[-1, -1, spec.output_size])
    return response


def model_config(model: ServedModel) -> oip.ModelConfigResponse:
    """Triton's configuration of the model: a sequence model (idle time: the session TTL), one request one
    response, batched across sequences by the server (max_batch_size 1: one sequence per request)."""
    spec = model.spec
    config = oip.ModelConfig(name=spec.name, platform=PLATFORM, backend="conveyor", max_batch_size=1)
    config.input.add(
        name=spec.input_name, data_type=_DATATYPES[spec.input_kind][1], dims=list(_input_dims(spec))
    )
    config.output.add(name=spec.output_name, data_type=oip.TYPE_FP32, dims=[-1, spec.output_size])
    config.sequence_batching.max_sequence_idle_microseconds = round(model.idle_ttl_s * 1e6)
    config.model_transaction_policy.decoupled = False
    return oip.ModelConfigResponse(config=config)


def _input_dims(spec: ModelSpec) -> tuple[int, ...]:
    """x's dims past the batch: time (variable), then the features of a feature model."""
    return (-1,) if spec.input_kind == "tokens" else (-1, spec.input_size)


def _inputs(request: oip.ModelInferRequest, spec: ModelSpec) -> np.ndarray:
    """The one input as the chunk's [time] or [time, features] array."""
    names = [tensor.name for tensor in request.inputs]
    if names != [spec.input_name]:
        raise InvalidChunkError(f"the request's inputs are {names}: the model takes one, {spec.input_name!r}")
    tensor = request.inputs[0]
    datatype, _, wire = _DATATYPES[spec.input_kind]
    if tensor.datatype != datatype:
        raise InvalidChunkError(f"input {tensor.name!r} is {tensor.datatype}: the model takes {datatype}")
    shape = list(tensor.shape)
    wanted = [1, -1, *_input_dims(spec)[1:]]
    if (
        len(shape) != len(wanted)
        or shape[0] != 1
        or any(w > 0 and s != w for s, w in zip(shape, wanted, strict=True))
    ):
        raise InvalidChunkError(
            f"input {tensor.name!r} has shape {shape}: the model takes {wanted} (one sequence per request, "
            "-1: any length)"
        )
    values = _values(request, tensor, wire)
    if values.size != int(np.prod(shape)):
        raise InvalidChunkError(f"input {tensor.name!r} holds {values.size} values for shape {shape}")
    return values.reshape(shape[1:])


def _values(
    request: oip.ModelInferRequest, tensor: oip.ModelInferRequest.InferInputTensor, wire: str
) -> np.ndarray:
    if request.raw_input_contents:
        raw = request.raw_input_contents[0]
        if len(raw) % np.dtype(wire).itemsize:
            raise InvalidChunkError(
                f"raw input holds {len(raw)} bytes, not a whole number of {wire[1:]} values"
            )
        return np.frombuffer(raw, wire)
    typed = tensor.contents.int64_contents if wire == "<i8" else tensor.contents.fp32_contents
    return np.array(typed, wire)


def _parameter(parameters: Mapping[str, oip.InferParameter], name: str) -> oip.InferParameter | None:
    # `in` first: reading a missing key of a protobuf map would add it.
    return parameters[name] if name in parameters else None  # noqa: SIM401


def _flag(parameters: Mapping[str, oip.InferParameter], name: str) -> bool:
    parameter = _parameter(parameters, name)
    if parameter is None:
        return False
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidChunkError(f"{name} must be a bool parameter")
    return parameter.bool_param


def _int(parameters: Mapping[str, oip.InferParameter], name: str) -> int | None:
    parameter = _parameter(parameters, name)
    if parameter is None:
        return None
    if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise InvalidChunkError(f"{name} must be an int64 parameter")
    value = parameter.int64_param or parameter.uint64_param
    if value < 0:
        raise InvalidChunkError(f"{name} must be >= 0, got {value}")
    return value
