"""The server's endpoints: the gRPC server (Conveyor, health, reflection, interceptors), its port (plaintext
or TLS), and the /metrics HTTP server."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from serving.server.config import ServerConfig
from serving.server.interceptor import RpcMetricsInterceptor
from serving.server.malformed import MalformedRequestInterceptor
from serving.server.metrics import ConveyorMetrics
from serving.server.oip_service import InferenceServicer
from serving.server.service import ConveyorServicer
from serving.server.tls import server_credentials
from serving.wire import oip, oip_grpc, pb, pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Conveyor"].full_name


def grpc_server(
    servicer: ConveyorServicer, inference: InferenceServicer, metrics: ConveyorMetrics
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server: Conveyor, the Open Inference Protocol, health and reflection, behind the metrics and
    malformed-request interceptors."""
    # so_reuseport off: a second server on a taken port must fail, not silently share it.
    server = grpc.aio.server(
        interceptors=[RpcMetricsInterceptor(metrics), MalformedRequestInterceptor()],
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_ConveyorServicer_to_server(servicer, server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE_NAME,
        oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def bind(
    server: grpc.aio.Server, config: ServerConfig, registry: CollectorRegistry
) -> tuple[int, WSGIServer]:
    # Both become OSError with the address in the message: the CLI prints it as one readable line.
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}: the port is taken or the host is not local") from exc
    try:
        http, _ = start_http_server(config.metrics_port, config.host, registry)
    except OSError as exc:
        raise OSError(
            f"cannot serve /metrics on {config.host}:{config.metrics_port}: {exc.strerror}"
        ) from exc
    return port, http


def process_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


def close_http(http: WSGIServer) -> None:
    http.shutdown()
    http.server_close()
