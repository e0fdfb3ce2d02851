"""What a versions run (`conveyor bench --versions`, `serving.bench.versions`) measures: its options, its
cases, and the row each part of a case gives; light to import, as `serving.bench.grid` is, so the CLI can
build its parser cheaply.

Cases, at each chunk length, every one in the same run so that their ratios are taken minutes apart at most:
    one_version  a repository of one version (v1), `sessions` sessions at full load
    two_busy     the same artifact as two versions served at once (v1, v2, `{"latest": 2}`), half the
                 sessions on each, both at full load: each version its own engine, batch queue and runner
    small_alone  the two-version server, `small_sessions` paced sessions on v2 (a chunk every
                 `small_period_ms`) and v1 idle
    small_busy   the same small sessions on v2 while v1 carries `sessions` sessions at full load
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from serving.bench.audio_grid import Column
from serving.bench.grid import BenchError
from serving.server.config import ServerConfig

CASES = ("one_version", "two_busy", "small_alone", "small_busy")
BOTH = "1+2"  # the version of a row that sums a case's parts

# The versions table's columns (serving.bench.report formats them).
COLUMNS: tuple[Column, ...] = (
    ("case", "case", 11, ""),
    ("version", "version", 7, ""),
    ("sessions", "sessions", 8, "d"),
    ("chunk_steps", "chunk", 5, "d"),
    ("period_ms", "pace ms", 7, ".0f"),
    ("timesteps_per_s", "steps/s", 9, ".0f"),
    ("chunks_per_s", "chunks/s", 9, ".0f"),
    ("p50_ms", "p50 ms", 7, ".3f"),
    ("p99_ms", "p99 ms", 7, ".3f"),
    ("cpu_s_per_1k_steps", "srv cpu/1k", 10, ".4f"),
    ("load_cpu_s_per_1k_steps", "load cpu/1k", 11, ".4f"),
    ("mean_batch", "batch", 6, ".1f"),
)


@dataclass(frozen=True)
class VersionsOptions:
    """A versions run: the artifact published as the versions, the load, and the length of each case."""

    model_dir: Path
    sessions: int = 64  # full load: one version's, or split in halves between two
    chunk_steps: tuple[int, ...] = (1, 32)  # every case at each
    small_sessions: int = 2  # the small version's, paced
    small_period_ms: float = 20.0  # between a small session's chunks (less when an answer takes longer)
    channels: int = 16  # gRPC channels of the full load (split between two busy versions); small: its own
    warmup_s: float = 1.0  # per case
    seconds: float = 4.0  # measured per case
    max_batch_size: int = 64  # each version's
    ort_threads: int = 1  # the server's ort_intra_op_threads
    ort_parallel_calls: int = ServerConfig.ort_parallel_calls
    repeats: int = 3  # passes over the cases, alternated; each figure is the median of its passes

    def __post_init__(self) -> None:
        counts = (self.small_sessions, self.channels, self.max_batch_size, self.repeats, *self.chunk_steps)
        if self.sessions < 2 or min(counts, default=0) < 1 or self.ort_parallel_calls < 1:
            raise BenchError(
                "versions: sessions >= 2 (split between two versions); small sessions, chunk steps, "
                "channels, batch size, repeats, parallel calls >= 1"
            )
        if self.seconds <= 0 or self.warmup_s < 0 or self.small_period_ms <= 0:
            raise BenchError("--seconds and --small-period-ms must be > 0 and the warm-up >= 0")


def quick_versions(options: VersionsOptions) -> VersionsOptions:
    """`--versions --quick`: 1-step chunks, one pass of short cases; well under a minute."""
    return replace(options, chunk_steps=(1,), warmup_s=0.5, seconds=1.5, repeats=1)


@dataclass(frozen=True)
class VersionsRow:
    """One part of a case (the sessions of one version), or the case's parts summed (version `BOTH`)."""

    case: str
    version: str  # the version the sessions run on ("1", "2"), or BOTH
    sessions: int
    chunk_steps: int
    period_ms: (
        float | None
    )  # a paced part's pace; None: full load (each chunk leaves when the last is answered)
    timesteps_per_s: float
    chunks_per_s: float
    p50_ms: float  # chunk latency, send to response
    p99_ms: float
    # The server's and the load process's CPU and the mean batch: the whole case's, so only on its one part's
    # row, or on its summed row.
    cpu_s_per_1k_steps: float | None
    load_cpu_s_per_1k_steps: float | None
    mean_batch: float | None
    chunks: int  # chunks answered in the measured window
    seconds: float  # the measured window

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return asdict(self)
