"""What an audio run (`conveyor bench --audio`, `serving.bench.audio`) measures: its options and the row each
point gives; light to import, as `serving.bench.grid` is, so the CLI can build its parser cheaply."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.bench.grid import BenchError
from serving.server.config import ServerConfig

Column = tuple[str, str, int, str]  # as serving.bench.report's: (row key, title, width, format suffix)

AUDIO_MODES = ("frames", "stream", "silero_loop", "ort_floor")

# The audio table's columns (serving.bench.report formats them).
COLUMNS: tuple[Column, ...] = (
    ("mode", "mode", 11, ""),
    ("streams", "streams", 7, "d"),
    ("windows_per_s", "windows/s", 9, ".0f"),
    ("p50_ms", "p50 ms", 7, ".2f"),
    ("p99_ms", "p99 ms", 7, ".2f"),
    ("dropped", "dropped", 7, "d"),
    ("held", "held", 4, ""),
    ("cpu_ms_per_window", "srv cpu/win ms", 14, ".4f"),
    ("load_cpu_ms_per_window", "load cpu/win ms", 15, ".4f"),
    ("mean_batch", "batch", 6, ".1f"),
    ("note", "", 0, ""),
)


@dataclass(frozen=True)
class AudioOptions:
    """An audio run: the framed model to serve, the modes, the search and the length of each point."""

    model_dir: Path
    modes: tuple[str, ...] = AUDIO_MODES
    first_streams: int = 32  # the search's first count, doubled while held
    most_streams: int = 2048  # the most it tries
    fine_steps: int = 3  # bisections between the last count held and the first missed
    warmup_s: float = 1.0  # per point, after every stream has started
    seconds: float = 6.0  # measured per point
    settle_s: float = 1.0  # after a point: a window of it not answered by then is dropped
    channels: int = 16  # the stream mode's connections
    max_batch_size: int = 64  # the server's
    ort_threads: int = 1  # the server's, and the floor's
    ort_parallel_calls: int = ServerConfig.ort_parallel_calls  # the server's, and the floor's
    chunk: int = 320  # samples per chunk: 20 ms
    rate: int = 16000  # samples per second

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(AUDIO_MODES)
        if unknown:
            raise BenchError(f"unknown audio modes {sorted(unknown)}: choose from {', '.join(AUDIO_MODES)}")
        counts = (self.first_streams, self.fine_steps + 1, self.channels, self.max_batch_size, self.chunk)
        if min(counts) < 1 or self.most_streams < self.first_streams:
            raise BenchError("streams, chunk, channels, batch size: >= 1; fine steps >= 0; first <= most")
        if self.seconds <= 0 or min(self.warmup_s, self.settle_s) < 0:
            raise BenchError("--seconds must be > 0 and the warm-up >= 0")


@dataclass(frozen=True)
class AudioRow:
    """One point of a search (or the floor): the JSON row and a line of the table."""

    mode: str
    streams: int  # ort_floor: the streams its windows per second would carry
    windows_per_s: float  # windows due per second (ort_floor: run per second)
    p50_ms: float | None  # window latency, due to answer (ort_floor: one runner call)
    p99_ms: float | None
    dropped: int | None  # chunks taken in over a window late, and windows never answered (ort_floor: None)
    held: bool | None  # p99 under one window period, nothing dropped (ort_floor: None)
    cpu_ms_per_window: float | None  # the server's CPU (silero_loop, ort_floor: the process running ORT)
    load_cpu_ms_per_window: float | None  # the load process's, for context: it shares the cores
    mean_batch: float | None  # windows per ORT call
    windows: int  # windows in the measured interval
    seconds: float  # the measured interval
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return asdict(self)
