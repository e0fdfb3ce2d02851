"""Real services for tests, started on free loopback ports and stopped afterwards: redis-server and nginx
(Debian's), and `conveyor serve` in processes of its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server process of our own. `durable` keeps its data across `stop` and `start` (AOF, fsync
    always), as a production Redis for sessions would."""

    def __init__(self, directory: Path, *, durable: bool) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._durable = durable
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart, on the same port and data) and wait until it answers."""
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self._durable else []
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self._directory), *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                assert self._process.poll() is None, f"redis-server exited: {self._process.returncode}"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM: an AOF is flushed) and wait for it."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def client(self) -> redis.Redis:
        """A plain client, for looking inside."""
        return redis.Redis(port=self.port)


@contextmanager
def redis_server(directory: Path, *, durable: bool = False) -> Iterator[RedisServer]:
    """A started redis-server; skips the test where Debian's redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; make test does)")
    server = RedisServer(directory, durable=durable)
    server.start()
    try:
        yield server
    finally:
        server.stop()


ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


@contextmanager
def conveyor_process(
    artifact: Path,
    store: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    *,
    repository: bool = False,
) -> Iterator[ServerProcess]:
    """`conveyor serve` for `artifact` (with `repository`, a model repository) on `store` (more CONVEYOR_*
    settings in `env`), in a process of its own, SERVING; killed on exit."""
    server = ServerProcess(artifact, store, port or free_port(), env or {}, repository)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class ServerProcess:
    """One `conveyor serve` process on a fixed port (so that a restart comes back where the proxy expects)."""

    def __init__(
        self, artifact: Path, store: str, port: int, env: dict[str, str], repository: bool = False
    ) -> None:
        self.port = port
        self._source = "--models" if repository else "--model"
        self._env = env
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = free_port()
        self._artifact, self._store = artifact, store
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until its health service says SERVING."""
        from serving.client import ConveyorClient

        env = {**os.environ, **self._env, "CONVEYOR_STORE": self._store}
        env["CONVEYOR_METRICS_PORT"] = str(self.metrics_port)
        command = [sys.executable, "-m", "serving.cli", "serve", self._source, str(self._artifact),
                   "--port", str(self.port)]  # fmt: skip
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with ConveyorClient(self.target) as client:
            client.wait_for_ready(timeout_s=60)

    @property
    def metrics_url(self) -> str:
        """Its /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def chunks_answered(self) -> float:
        """Chunks it has answered, from its /metrics: the replica a proxy routed a stream to answers them."""
        from serving.client.scrape import scrape

        return scrape(self.metrics_url).total("conveyor_chunk_latency_seconds_count")

    def rss_bytes(self) -> int:
        """The process's resident memory."""
        assert self.process is not None
        pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")

    def kill(self) -> None:
        """SIGKILL: no drain, nothing flushed."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def terminate(self) -> int:
        """SIGTERM: a graceful stop; returns the exit status."""
        assert self.process is not None
        self.process.terminate()
        status = self.process.wait(30)
        self.process = None
        return status


@contextmanager
def nginx_proxy(directory: Path, upstreams: list[int], *, fail_timeout_s: int = 10) -> Iterator[int]:
    """Debian's nginx with deploy/nginx/nginx.conf, its replicas replaced by `upstreams` (loopback ports) and
    its passive-health timeout by `fail_timeout_s`; yields the port it listens on. Skips the test where nginx
    is not installed."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (apt-get install -y nginx; make test does)")
    port = free_port()
    conf = NGINX_CONF.read_text().replace("listen 50051", f"listen 127.0.0.1:{port}")
    servers = [f"server server-{i}:50051" for i in (1, 2)]
    assert all(server in conf for server in servers), (
        "deploy/nginx/nginx.conf no longer names server-1, server-2"
    )
    for server, upstream in zip(servers, upstreams, strict=True):
        conf = conf.replace(server, f"server 127.0.0.1:{upstream}")
    conf = conf.replace("fail_timeout=10s", f"fail_timeout={fail_timeout_s}s")
    (directory / "nginx.conf").write_text(conf)
    globals_ = f"daemon off; pid {directory}/nginx.pid; error_log {directory}/error.log;"
    process = subprocess.Popen(
        [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", globals_]
    )
    try:
        _wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def replicas_behind_nginx(
    artifact: Path, directory: Path, *, fail_timeout_s: int = 10
) -> Iterator[tuple[ServerProcess, ServerProcess, int]]:
    """Two `conveyor serve` replicas of `artifact` on one durable redis-server, behind nginx: the replicas
    and the proxy's port (the fault tests' stage: kill -9 of one, the other answers from Redis)."""
    (directory / "redis").mkdir()
    with (
        redis_server(directory / "redis", durable=True) as redis,
        conveyor_process(artifact, redis.url) as one,
        conveyor_process(artifact, redis.url) as two,
        nginx_proxy(directory, [one.port, two.port], fail_timeout_s=fail_timeout_s) as proxy_port,
    ):
        yield one, two, proxy_port


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.02)
