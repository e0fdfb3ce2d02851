"""The Open Inference Protocol's servicer (`inference.GRPCInferenceService`, as Triton's clients and
perf_analyzer speak it), on the same server and port as Conveyor's own, over the same models: v2 and native
requests share sessions, versions, batches, the store, tenants and metrics. A request's model_name and
model_version route it as a native chunk's model and model_version do. Protobuf in, engine call, protobuf out
(translated by `serving.server.oip_translate`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from serving.domain.errors import InvalidChunkError
from serving.domain.models import Version
from serving.server.malformed import Malformed
from serving.server.oip_translate import (
    chunk_from_infer,
    end_notice,
    infer_response,
    model_config,
    model_metadata,
    sequence_key,
    sequence_start,
    server_metadata,
    status_of,
)
from serving.server.outbox import Outbox
from serving.server.streams import ServingParts, StreamKind, abort, namespace_of
from serving.server.translate import status_for
from serving.wire import oip, oip_grpc

_Answer = oip.ModelInferResponse | tuple[grpc.StatusCode, str]


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Implements the protocol's health, metadata, configuration and inference RPCs on the served `Models`."""

    def __init__(self, parts: ServingParts) -> None:
        self._models, self._streams, self._counter, self._tenants = parts
        self._stream = StreamKind(
            lambda request: request.ByteSize(), self._answer_in_band, end_notice, self._refused
        )

    async def ServerLive(  # noqa: N802 (gRPC method names)
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._models.accepting)

    async def ModelReady(  # noqa: N802
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        version = await self._described(request.name, request.version, context)
        return oip.ModelReadyResponse(ready=version.live and version.served.accepting)

    async def ServerMetadata(  # noqa: N802
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return server_metadata()

    async def ModelMetadata(  # noqa: N802
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        version = await self._described(request.name, request.version, context)
        live = [v.number for v in self._models.versions() if v.name == version.name and v.live]
        return model_metadata(version.served.model.spec, live)

    async def ModelConfig(  # noqa: N802
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        version = await self._described(request.name, request.version, context)
        return model_config(version.served.model)

    async def ModelInfer(  # noqa: N802
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        """One request of a sequence; an error is the call's status."""
        received = time.perf_counter()
        answer = await self._infer(request, received, await namespace_of(self._tenants, context))
        if isinstance(answer, tuple):
            await abort(context, *answer)
        return answer

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Each request answered in band, errors as `error_message` with the request's id; the stream stays
        open. A sequence the server ends (idle, capacity, shutdown) is told in band too."""
        namespace = await namespace_of(self._tenants, context)
        async for response in self._streams.serve(request_iterator, context, namespace, self._stream):
            yield response

    async def _answer_in_band(
        self,
        request: oip.ModelInferRequest,
        received: float,
        outbox: Outbox[oip.ModelStreamInferResponse],
        namespace: str,
        cost: int,
    ) -> None:
        answer = await self._infer(request, received, namespace, outbox)
        if isinstance(answer, tuple):
            failed = oip.ModelInferResponse(id=request.id, model_name=request.model_name)
            outbox.answer(oip.ModelStreamInferResponse(error_message=answer[1], infer_response=failed), cost)
        else:
            outbox.answer(oip.ModelStreamInferResponse(infer_response=answer), cost)

    async def _infer(
        self,
        request: oip.ModelInferRequest,
        received: float,
        namespace: str,
        outbox: Outbox[oip.ModelStreamInferResponse] | None = None,
    ) -> _Answer:
        """The response to `request`, or its status and message; counted as a chunk answered either way."""
        watcher = outbox.watcher if outbox is not None else None
        version: Version | None = None
        try:
            version = await self._models.route(
                request.model_name,
                request.model_version,
                namespace,
                sequence_key(request.parameters),
                sequence_start(request),
            )
            chunk = chunk_from_infer(request, version.served.model, namespace)
            result = await self._models.apply(version, chunk, watcher, outbox)
        except Exception as exc:
            code, message = status_of(exc, request)
            self._counter.count(received, [code], version=version)
            return code, message
        if outbox is not None:
            outbox.touched.add(result.session_id)
        self._counter.count(received, answered=1, version=version)
        return infer_response(request, result, version)

    def _refused(self, request: Malformed, received: float) -> oip.ModelStreamInferResponse:
        code, message = status_for(InvalidChunkError(request.describe()))
        self._counter.count(received, [code])
        return oip.ModelStreamInferResponse(error_message=message)

    async def _described(self, name: str, version: str, context: grpc.aio.ServicerContext) -> Version:
        """The version a metadata request names (`Models.describe`), or the call ends NOT_FOUND."""
        await namespace_of(self._tenants, context)
        try:
            return self._models.describe(name, version)
        except Exception as exc:
            await abort(context, *status_for(exc))
