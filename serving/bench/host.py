"""The server side of the bench, in its own process: the real server (of one model, or of a model
repository) or the echo server.

The parent starts `python -m serving.bench.host SPEC_JSON`, reads one JSON line with the ports, and stops
the child by closing its stdin. A separate process keeps the load generator's CPU out of the server's, and
lets the parent read the server's CPU time and resident memory from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from serving.bench.grid import BenchError
from serving.client.scrape import scrape

_STOP_GRACE_S = 1.0


@dataclass(frozen=True)
class HostSpec:
    """What to start: `kind` "server" (with ServerConfig fields in `config`), "repository" (the same, serving
    the model repository at `model_dir`) or "echo"."""

    kind: str
    model_dir: Path
    config: dict[str, Any] = field(default_factory=dict)


class Host:
    """A server the load process targets; with a `process`, one this bench started and can measure."""

    def __init__(self, target: str, process: subprocess.Popen[str] | None, metrics_port: int | None) -> None:
        self.target = target
        self._process = process
        self._metrics_port = metrics_port

    def cpu_s(self) -> float | None:
        """The server process's CPU time (user + system), None for a server started elsewhere."""
        if self._process is None:
            return None
        after_name = Path(f"/proc/{self._process.pid}/stat").read_text().rpartition(")")[2].split()
        utime, stime = int(after_name[11]), int(after_name[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        if self._process is None:
            raise BenchError("resident memory needs a server started by the bench")
        pages = int(Path(f"/proc/{self._process.pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")

    def batch_totals(self) -> tuple[float, float] | None:
        """(rows, runner calls) so far, from the server's /metrics; None when it has none to read."""
        if self._metrics_port is None:
            return None
        metrics = scrape(f"http://127.0.0.1:{self._metrics_port}/metrics", timeout_s=10)
        return metrics.total("conveyor_batch_size_sum"), metrics.total("conveyor_batch_size_count")


def runner_config(intra_op_threads: int, parallel_calls: int) -> dict[str, Any]:
    """The server's ONNX Runtime settings, as a host spec's config takes them."""
    return {"ort_intra_op_threads": intra_op_threads, "ort_parallel_calls": parallel_calls}


@contextmanager
def hosting(spec: HostSpec | None, target: str | None = None) -> Iterator[Host]:
    """A started host for `spec` (stopped on exit), or a `target` someone else runs."""
    if spec is None:
        if target is None:
            raise BenchError("nothing to target: no host spec and no --target")
        yield Host(target, None, None)
        return
    argv = [sys.executable, "-m", "serving.bench.host", json.dumps(_spec_json(spec))]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise BenchError(f"the bench's {spec.kind} process failed to start (its errors are above)")
        ports = json.loads(line)
        yield Host(f"127.0.0.1:{ports['port']}", process, ports.get("metrics_port"))
    finally:
        _stop(process)


def _spec_json(spec: HostSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "model_dir": str(spec.model_dir), "config": spec.config}


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()  # the child's signal to stop
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _serve(spec: dict[str, Any], out: TextIO) -> None:
    from prometheus_client import CollectorRegistry

    from serving.server.app import build_server, settle_heap
    from serving.server.config import ServerConfig

    served: dict[str, Any] = {
        "models_dir" if spec["kind"] == "repository" else "model_dir": Path(spec["model_dir"])
    }
    config = ServerConfig(**served, port=0, metrics_port=0, **spec["config"])
    server = build_server(config, CollectorRegistry())
    settle_heap()  # as `conveyor serve` does
    try:
        print(json.dumps({"port": server.port, "metrics_port": server.metrics_port}), file=out, flush=True)
        sys.stdin.read()
    finally:
        server.stop(_STOP_GRACE_S)


async def _echo(spec: dict[str, Any], out: TextIO) -> None:
    from modelcard import CARD_FILE, spec_from_card
    from serving.bench.echo import start_echo

    card = json.loads((Path(spec["model_dir"]) / CARD_FILE).read_text())
    server, port = await start_echo(
        spec_from_card(card), "127.0.0.1", spec["config"].get("max_chunk_steps", 1024)
    )
    print(json.dumps({"port": port}), file=out, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(_STOP_GRACE_S)


def main(argv: list[str]) -> None:
    """The child process: start what SPEC_JSON asks for, print its ports, run until stdin closes."""
    spec = json.loads(argv[0])
    if spec["kind"] == "echo":
        asyncio.run(_echo(spec, sys.stdout))
    else:
        _serve(spec, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
