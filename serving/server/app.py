"""Wiring: models -> (per version) store -> batcher -> engine -> servicer; health, reflection, /metrics,
graceful stop.

The gRPC server runs on its own asyncio loop in a background thread, so `build_server` returns a handle that
plain (synchronous) code drives: the CLI's `serve`, and tests that share one server across a module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import (
    CollectorRegistry,
)

from serving.domain.errors import ModelLoadError
from serving.domain.models import Models, Version, VersionState
from serving.domain.runner import StepRunner
from serving.server.auth import Tenants
from serving.server.config import ServerConfig
from serving.server.endpoints import bind, close_http, grpc_server, process_registry, set_health
from serving.server.metrics import ConveyorMetrics
from serving.server.oip_service import InferenceServicer
from serving.server.outbox import StreamLimits
from serving.server.repository import Repository, Serving, load_runner, serve_version
from serving.server.service import ConveyorServicer
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
    models: Models
    repository: Repository | None
    streams: Streams
    http: WSGIServer  # serves /metrics
    port: int
    metrics_port: int
    stopped: asyncio.Event

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, in-flight chunks finish, sessions end (shutdown), streams close, then stop."""
        await self.health.enter_graceful_shutdown()
        if self.repository is not None:
            self.repository.stop()
        await self.models.close(grace_s)
        self.streams.close()
        await self.server.stop(_FINAL_GRACE_S)
        await asyncio.to_thread(close_http, self.http)
        self.stopped.set()


class RunningServer:
    """A started server: its bound ports, and `stop`. Also a context manager that stops on exit."""

    def __init__(
        self,
        app: _App,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
    ) -> None:
        self.port = app.port
        self.metrics_port = app.metrics_port
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

    def versions(self) -> list[Version]:
        """The model versions the server holds now (a copy, read on its loop)."""

        async def read() -> list[Version]:
            return [dataclasses.replace(v) for v in self._app.models.versions()]

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result()

    def rescan(self) -> None:
        """Look at the model repository now rather than at the next poll (for tests and tools); wait for the
        scan, loads included."""
        if self._app.repository is not None:
            asyncio.run_coroutine_threadsafe(self._app.repository.scan(), self._loop).result()

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
    """Load the model (or the repository's models), start gRPC and /metrics, and return once health says
    SERVING.

    Port 0 (gRPC or metrics) binds a free port; the handle's `port` and `metrics_port` are the real ones.
    `runner` replaces loading `config.model_dir`; `clock` replaces the store's clock for session expiry (both
    for tests). Raises `ModelLoadError` when the model cannot be served (or the repository holds none that
    can), `StoreUnavailableError` when the session store cannot be reached, `OSError` or `RuntimeError` when a
    port is taken.
    """
    if runner is None and config.model_dir is not None:
        runner = load_runner(config, config.model_dir)
    registry = registry or process_registry()
    started: concurrent.futures.Future[tuple[_App, asyncio.AbstractEventLoop]] = concurrent.futures.Future()
    thread = threading.Thread(
        target=_run_loop, args=(config, registry, runner, clock, started), name="conveyor-server", daemon=True
    )
    thread.start()
    app, loop = started.result()
    return RunningServer(app, config, loop, thread)


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
    for version in server.versions():
        logger.info(
            "model %s version %d: %s (fingerprint %s)",
            version.name,
            version.number,
            version.state.value,
            version.fingerprint,
        )
    logger.info(
        "serving on %s:%d (gRPC), metrics on http://%s:%d/metrics",
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
    runner: StepRunner | None,
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
    config: ServerConfig,
    registry: CollectorRegistry,
    runner: StepRunner | None,
    clock: Callable[[], float] | None,
) -> _App:
    tenants = Tenants.load(config.tokens_file) if config.tokens_file else None  # before anything is opened
    metrics = ConveyorMetrics(registry)
    metrics.set_limits(config.max_sessions, config.drain_deadline_s)
    models = Models(pins_max=4 * config.max_sessions, on_state=_publisher(metrics))
    serving = Serving(config, metrics, tenants.quotas() if tenants else None, clock)
    repository = await _load_models(models, runner, serving)
    metrics.track_state_bytes(models.state_bytes)
    stream_limits = StreamLimits(config.max_inflight_per_stream, config.stream_max_bytes, config.max_streams)
    streams = Streams(models, stream_limits)
    parts = ServingParts(models, streams, ChunkCounter(metrics), tenants)
    servicer, inference = ConveyorServicer(parts), InferenceServicer(parts)
    metrics.track_held_bytes(lambda: {**models.held_bytes(), "stream": streams.held_bytes()})
    server, health_servicer = grpc_server(servicer, inference, metrics)
    await set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port, http = bind(server, config, registry)
    except BaseException:
        await models.close(0)
        raise
    try:
        await server.start()
    except BaseException:
        close_http(http)
        await models.close(0)
        raise
    if repository is not None:
        repository.start()
    # The runners were loaded and warmed up before this point: ready to serve.
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = int(http.server_address[1])
    return _App(
        server, health_servicer, models, repository, streams, http, port, metrics_port, asyncio.Event()
    )


async def _load_models(models: Models, runner: StepRunner | None, serving: Serving) -> Repository | None:
    """The one model as version 1 (`runner`), or the repository's models (scanned once; then watched, the
    returned repository); `ModelLoadError` when none could be loaded."""
    root = serving.config.models_dir
    if root is None:
        assert runner is not None  # build_server loaded it
        await serve_version(models, models.loading(runner.spec.name, 1), runner, serving)
        return None
    repository = Repository(root, models, serving)
    await repository.scan()
    if not any(version.live for version in models.versions()):
        failed = "; ".join(f"{v.name}/{v.number}: {v.message}" for v in models.versions())
        await models.close(0)
        raise ModelLoadError(f"the model repository {root} holds no model that loads ({failed or 'empty'})")
    return repository


def _publisher(metrics: ConveyorMetrics) -> Callable[[Version], None]:
    """What publishes each version's state as metrics: its info series, its draining time, its gauges gone
    once retired."""

    def publish(version: Version) -> None:
        labels = version.labels
        metrics.version_state(labels, version.fingerprint, version.state.value)
        since = version.draining_since
        if version.state is VersionState.DRAINING and since is not None:
            metrics.track_draining(labels, lambda: time.monotonic() - since)
        if version.state is VersionState.RETIRED:
            metrics.untrack_version(labels)

    return publish
