"""The transport floor: a conveyor.v1 server answering every chunk with a response of the real size, no model.

It parses each request and builds each response as the real servicer must, on the same grpc.aio stack, so the
difference between `echo` and `batched` is what the model, the session store and the batcher cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np

from modelcard import ModelSpec
from serving.domain.chunks import ServedModel
from serving.server.translate import model_info_to_pb
from serving.wire import pb
from serving.wire.tensors import encode

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Conveyor"].full_name


class EchoServicer:
    """Stream answers each request, in order, with zeros of the output size; GetModelInfo gives the sizes."""

    def __init__(self, spec: ModelSpec, max_chunk_steps: int) -> None:
        self._spec = spec
        self._max_chunk_steps = max_chunk_steps
        self._outputs: dict[int, pb.Tensor] = {}  # by timesteps: built once, copied into each response

    async def Stream(  # noqa: N802 (gRPC method names)
        self, request_iterator: AsyncIterator[pb.ChunkRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """One response per request, the real response's size. Reading runs ahead of writing, as in the
        real servicer: a stream that read its next request only after writing would be a slower floor."""
        responses: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, responses))
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:
            reader.cancel()

    async def _read(
        self, requests: AsyncIterator[pb.ChunkRequest], responses: asyncio.Queue[pb.StreamResponse | None]
    ) -> None:
        try:
            async for request in requests:
                responses.put_nowait(self._respond(request))
        finally:
            responses.put_nowait(None)

    def _respond(self, request: pb.ChunkRequest) -> pb.StreamResponse:
        steps = request.inputs.shape[0] if request.inputs.shape else 0
        rows = 1 if request.outputs == pb.OUTPUT_MODE_LAST else steps
        chunk = pb.ChunkResponse(
            session_id=request.session_id,
            request_id=request.request_id,
            offset=request.offset,
            steps=request.offset + steps,
            outputs=self._zeros(rows),
            ended=request.end,
        )
        return pb.StreamResponse(chunk=chunk)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """The sizes a load generator needs to build real-sized requests."""
        return model_info_to_pb(ServedModel(self._spec, self._max_chunk_steps, idle_ttl_s=0.0))

    def _zeros(self, rows: int) -> pb.Tensor:
        tensor = self._outputs.get(rows)
        if tensor is None:
            tensor = self._outputs[rows] = encode(np.zeros((rows, self._spec.output_size), np.float32))
        return tensor


async def start_echo(spec: ModelSpec, host: str, max_chunk_steps: int) -> tuple[grpc.aio.Server, int]:
    """Start an echo server on a free port of `host`; returns it and its port."""
    echo = EchoServicer(spec, max_chunk_steps)
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            echo.Stream, pb.ChunkRequest.FromString, pb.StreamResponse.SerializeToString
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            echo.GetModelInfo, pb.ModelInfoRequest.FromString, pb.ModelInfo.SerializeToString
        ),
    }
    server = grpc.aio.server()
    # Only the two methods the load process calls; the others answer UNIMPLEMENTED.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port
