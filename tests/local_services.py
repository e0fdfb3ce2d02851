"""Real services for tests, started on free loopback ports and stopped afterwards: redis-server (Debian's)."""

from __future__ import annotations

import shutil
import socket
import subprocess
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
