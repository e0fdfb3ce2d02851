"""Wiring: model -> store -> batcher -> engine -> servicer; health, reflection, /metrics, graceful stop.

The gRPC server runs on its own asyncio loop in a background thread, so `build_server` returns a handle that
plain (synchronous) code drives: the CLI's `serve`, and tests that share one server across a module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import math
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import (
    CollectorRegistry,
)

from modelcard import ModelSpec
from serving.domain.batcher import Batcher
from serving.domain.chunks import ServedModel
from serving.domain.engine import Engine
from serving.domain.runner import StepRunner
from serving.domain.sessions.lifecycle import SessionLimits, Sessions
from serving.server.auth import Tenants
from serving.server.config import ServerConfig
from serving.server.endpoints import bind, close_http, grpc_server, process_registry, set_health
from serving.server.metrics import ConveyorMetrics
from serving.server.oip_service import InferenceServicer
from serving.server.onnx_runner import OnnxStepRunner
from serving.server.outbox import StreamLimits
from serving.server.service import ConveyorServicer
from serving.server.stores import open_store
from serving.server.streams import ChunkCounter, ServingParts, Streams

logger = logging.getLogger(__name__)

# Once chunks have drained and streams were told, the gRPC server itself only waits this long (e.g. for health
# watchers, which never end on their own).
_FINAL_GRACE_S = 1.0


@dataclass
class _App:
    """The running parts, owned by the server thread's loop."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    engine: Engine
    streams: Streams
    batcher: Batcher
    close_store: Callable[[], Awaitable[None]]
    http: WSGIServer  # serves /metrics
    port: int
    metrics_port: int
    stopped: asyncio.Event

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, in-flight chunks finish, sessions end (shutdown), streams close, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.engine.close(grace_s)
        self.streams.close()
        await self.server.stop(_FINAL_GRACE_S)
        self.batcher.close()
        await self.close_store()
        await asyncio.to_thread(close_http, self.http)
        self.stopped.set()


class RunningServer:
    """A started server: its bound ports, and `stop`. Also a context manager that stops on exit."""

    def __init__(
        self,
        app: _App,
        spec: ModelSpec,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
    ) -> None:
        self.port = app.port
        self.metrics_port = app.metrics_port
        self.spec = spec
        self._app, self._config, self._loop, self._thread = app, config, loop, thread
        self._stopping: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()

    def request_stop(self, grace_s: float | None = None) -> concurrent.futures.Future[None]:
        """Begin a graceful stop without waiting for it; later calls return the first call's future."""
        with self._lock:
            # Only the first request runs: the loop ends with that stop, so a second one could never finish.
            if self._stopping is None:
                grace = self._config.grace_s if grace_s is None else grace_s
                self._stopping = asyncio.run_coroutine_threadsafe(self._app.stop(grace), self._loop)
            return self._stopping

    def stop(self, grace_s: float | None = None) -> None:
        """Stop gracefully (in-flight chunks get `grace_s`, default the config's) and wait until it has."""
        self.request_stop(grace_s).result()
        self._thread.join()

    def wait(self) -> None:
        """Block until the server has stopped."""
        self._thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def build_server(
    config: ServerConfig,
    registry: CollectorRegistry | None = None,
    *,
    runner: StepRunner | None = None,
    clock: Callable[[], float] | None = None,
) -> RunningServer:
    """Load the model, start gRPC and /metrics, and return once health says SERVING.

    Port 0 (gRPC or metrics) binds a free port; the handle's `port` and `metrics_port` are the real ones.
    `runner` replaces loading `config.model_dir`; `clock` replaces the store's clock for session expiry (both
    for tests). Raises `ModelLoadError` when the model cannot be served, `StoreUnavailableError` when the
    session store cannot be reached, `OSError` or `RuntimeError` when a port is taken.
    """
    runner = runner or OnnxStepRunner.load(
        config.model_dir,
        intra_op_threads=config.ort_intra_op_threads,
        parallel_calls=config.ort_parallel_calls,
    )
    registry = registry or process_registry()
    started: concurrent.futures.Future[tuple[_App, asyncio.AbstractEventLoop]] = concurrent.futures.Future()
    thread = threading.Thread(
        target=_run_loop, args=(config, registry, runner, clock, started), name="conveyor-server", daemon=True
    )
    thread.start()
    app, loop = started.result()
    return RunningServer(app, runner.spec, config, loop, thread)


def settle_heap() -> None:
    """Take what start-up allocated (modules, the model, protobuf descriptors: most of the heap, and alive for
    good) out of the garbage collector's passes. A full collection then walks only what serving allocates,
    which halves the tail latency under frames (docs/benchmarks.md). For a process that serves, after it has
    started (a test process that starts many servers would keep their garbage)."""
    gc.collect()
    gc.freeze()


def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully. Logs the ports and the model once ready."""
    server = build_server(config)
    settle_heap()
    spec = server.spec
    logger.info(
        "serving model %s (fingerprint %s) on %s:%d (gRPC), metrics on http://%s:%d/metrics",
        spec.name,
        spec.fingerprint,
        config.host,
        server.port,
        config.host,
        server.metrics_port,
    )
    previous = {
        sig: signal.signal(sig, lambda *_: server.request_stop()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped")


def _run_loop(
    config: ServerConfig,
    registry: CollectorRegistry,
    runner: StepRunner,
    clock: Callable[[], float] | None,
    started: concurrent.futures.Future[tuple[_App, asyncio.AbstractEventLoop]],
) -> None:
    async def main() -> None:
        try:
            app = await _start(config, registry, runner, clock)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result((app, asyncio.get_running_loop()))
        await app.stopped.wait()

    asyncio.run(main())


async def _start(
    config: ServerConfig, registry: CollectorRegistry, runner: StepRunner, clock: Callable[[], float] | None
) -> _App:
    spec = runner.spec
    tenants = Tenants.load(config.tokens_file) if config.tokens_file else None  # before anything is opened
    metrics = ConveyorMetrics(registry)
    metrics.set_model(spec.name, spec.fingerprint)
    limits = SessionLimits(
        idle_ttl_s=config.idle_ttl_s,
        lifetime_s=config.session_lifetime_s,
        max_sessions=config.max_sessions,
        evict_lru=config.evict_lru_at_capacity,
        replay_window_s=config.replay_window_s,
    )
    model = ServedModel(spec, config.max_chunk_steps, config.idle_ttl_s, config.replay_max_bytes)
    opened = await open_store(config, model, metrics)
    sessions = Sessions(opened.store, limits, clock=clock or opened.clock)
    metrics.track_sessions(sessions.__len__, math.prod(model.state_shape) * 4, config.max_sessions)
    batcher = Batcher(
        runner,
        max_batch_size=config.max_batch_size,
        max_delay_ms=config.max_delay_ms,
        inline_max_ms=config.inline_batch_max_ms,
        metrics=metrics,
    )
    engine = Engine(model, sessions, batcher, metrics, tenants.quotas() if tenants else None)
    stream_limits = StreamLimits(config.max_inflight_per_stream, config.stream_max_bytes, config.max_streams)
    streams = Streams(engine, stream_limits)
    parts = ServingParts(engine, streams, ChunkCounter(metrics), tenants)
    servicer, inference = ConveyorServicer(parts), InferenceServicer(parts)
    metrics.track_held_bytes(lambda: {**sessions.held_bytes(), "stream": streams.held_bytes()})
    server, health_servicer = grpc_server(servicer, inference, metrics)
    await set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port, http = bind(server, config, registry)
    except BaseException:
        await opened.close()
        raise
    try:
        await server.start()
    except BaseException:
        close_http(http)
        await opened.close()
        raise
    sessions.start_sweeper(config.sweep_interval_s)
    # The runner was loaded and warmed up before this point: ready to serve.
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = int(http.server_address[1])
    return _App(
        server,
        health_servicer,
        engine,
        streams,
        batcher,
        opened.close,
        http,
        port,
        metrics_port,
        asyncio.Event(),
    )
