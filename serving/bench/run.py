"""`run_bench`: a server process per server configuration, started once and kept for the whole run (so
cells of different modes can alternate), and a fresh load process per cell; one Row per cell."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, replace
from typing import Any, ClassVar, Protocol, TypeVar

from serving.bench.grid import BenchOptions, Cell, Row, plan, require_model
from serving.bench.host import Host, HostSpec, hosting, runner_config
from serving.bench.load import run_load
from serving.bench.wire import Job

FIGURES = (
    "timesteps_per_s",
    "chunks_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_s_per_1k_steps",
    "load_cpu_s_per_1k_steps",
    "mean_batch",
)


def run_bench(options: BenchOptions, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Measure every cell of `options`' grid, in `plan` order, `options.repeats` times; one row per cell, the
    median of its passes. `on_row` sees each pass's row once measured."""
    if options.model_dir is not None:
        require_model(options.model_dir)
    cells = plan(options)
    passes: dict[Cell, list[Row]] = {cell: [] for cell in cells}
    with ExitStack() as stack:
        hosts: dict[tuple[str, int, str], Host | None] = {}
        for cell in cells * options.repeats:
            key = _host_key(cell.mode, options)
            if key not in hosts:
                hosts[key] = stack.enter_context(_host_for(key, options))
            passes[cell].append(measure_cell(cell, hosts[key], options))
            if on_row is not None:
                on_row(passes[cell][-1])
    return [median_row(passes[cell]) for cell in cells]


class _Measured(Protocol):
    """A row measured in passes: a dataclass with its chunks and seconds (the grid's, the versions')."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def chunks(self) -> int: ...

    @property
    def seconds(self) -> float: ...


_Row = TypeVar("_Row", bound=_Measured)


def median_row(rows: Sequence[_Row], figures: Sequence[str] = FIGURES) -> _Row:
    """The first pass's row, each of its `figures` the median over the passes (of those measured); chunks
    and seconds summed."""
    if len(rows) == 1:
        return rows[0]
    medians: dict[str, Any] = {}
    for name in figures:
        values = [getattr(row, name) for row in rows if getattr(row, name) is not None]
        medians[name] = statistics.median(values) if values else None
    return replace(
        rows[0], **medians, chunks=sum(r.chunks for r in rows), seconds=sum(r.seconds for r in rows)
    )


def _host_key(mode: str, options: BenchOptions) -> tuple[str, int, str]:
    """What serves `mode`: (kind, max batch size, session store); stateless uses the batched server."""
    if options.target is not None:
        return ("target", 0, "")
    if mode in ("ort_floor", "echo"):
        return (mode, 0, "")
    store = (options.store or "") if mode == "durable" else "memory"
    return ("server", 1 if mode == "unbatched" else options.max_batch_size, store)


def _host_for(key: tuple[str, int, str], options: BenchOptions) -> AbstractContextManager[Host | None]:
    kind, batch, store = key
    if kind == "target":
        return hosting(None, options.target)
    if kind == "ort_floor":
        return nullcontext(None)
    assert options.model_dir is not None  # BenchOptions checks: a model or a target
    config: dict[str, Any] = {}
    if batch:
        config = {"max_batch_size": batch, "store": store}
        config |= runner_config(options.ort_threads, options.ort_parallel_calls)
    return hosting(HostSpec(kind, options.model_dir, config))


class Probe:
    """Reads the server's CPU time and batch totals as the load's measured window opens and closes."""

    def __init__(self, host: Host | None) -> None:
        self._host = host
        self.cpu_s: list[float | None] = []
        self.batches: list[tuple[float, float] | None] = []

    def start(self) -> None:
        # /metrics first, CPU second (and the reverse at stop): the scrape's own cost stays out of the window.
        self._read_batches()
        self.cpu_s.append(self._host.cpu_s() if self._host else None)

    def stop(self) -> None:
        self.cpu_s.append(self._host.cpu_s() if self._host else None)
        self._read_batches()

    def server_cpu_s(self) -> float | None:
        first, last = self.cpu_s
        return None if first is None or last is None else last - first

    def mean_batch(self) -> float | None:
        first, last = self.batches
        if first is None or last is None or last[1] == first[1]:
            return None
        return self.rows_run() / (last[1] - first[1])

    def rows_run(self) -> float:
        """Rows the server's runner ran between start and stop (0 when its /metrics were not read)."""
        first, last = self.batches
        return 0.0 if first is None or last is None else last[0] - first[0]

    def _read_batches(self) -> None:
        self.batches.append(self._host.batch_totals() if self._host else None)


def measure_cell(cell: Cell, host: Host | None, options: BenchOptions) -> Row:
    """One pass of `cell` against `host` (None: ort_floor, in the load process): its row."""
    job: Job = {
        "kind": "cell",
        "cell": asdict(cell),
        "target": host.target if host else None,
        "model_dir": str(options.model_dir),
        "warmup_s": options.warmup_s,
        "seconds": options.seconds,
        "ort_threads": options.ort_threads,
        "ort_parallel_calls": options.ort_parallel_calls,
        "max_batch_size": options.max_batch_size,
        "frames_in_flight": options.frames_in_flight,
    }
    probe = Probe(host)
    result = run_load(job, probe.start, probe.stop)
    steps, seconds = result["steps"], result["seconds"]
    in_process = cell.mode == "ort_floor"  # ORT ran in the load process: its CPU is the "server" CPU
    server_cpu_s = result["cpu_s"] if in_process else probe.server_cpu_s()
    return Row(
        mode=cell.mode,
        sessions=cell.sessions,
        chunk_steps=cell.chunk_steps,
        history_steps=cell.history_steps,
        channels=0 if in_process else cell.channels,
        timesteps_per_s=steps / seconds,
        chunks_per_s=result["chunks"] / seconds,
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        cpu_s_per_1k_steps=per_1k(server_cpu_s, steps),
        load_cpu_s_per_1k_steps=None if in_process else per_1k(result["cpu_s"], steps),
        mean_batch=float(result["batch"]) if in_process else probe.mean_batch(),
        chunks=result["chunks"],
        seconds=seconds,
    )


def per_1k(cpu_s: float | None, count: float) -> float | None:
    """CPU seconds per 1000 `count` (steps, or windows: then ms per window); None unread, NaN for none."""
    return None if cpu_s is None else (cpu_s * 1000 / count if count else math.nan)
