"""What a load process measures of a cell: the chunks and timesteps answered while its window is open, and
their latencies; the window's opening and closing are told to the parent (which reads the server's CPU)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.bench.wire import Job, say


@dataclass
class Window:
    """Counts chunks and keeps latencies of the responses that arrive while it is open."""

    latencies_s: list[float] = field(default_factory=list)
    chunks: int = 0
    steps: int = 0
    is_open: bool = False
    opened_s: float = 0.0
    closed_s: float = 0.0

    def record(self, latency_s: float, steps: int, chunks: int = 1) -> None:
        if self.is_open:
            self.latencies_s.append(latency_s)
            self.chunks += chunks
            self.steps += steps

    def open(self) -> None:
        self.opened_s, self.is_open = time.perf_counter(), True
        say("start")

    def close(self) -> None:
        self.closed_s, self.is_open = time.perf_counter(), False
        say("stop")

    def result(self, cpu_s: float, **extra: Any) -> Job:
        millis = np.percentile(self.latencies_s, (50, 99)) * 1000 if self.latencies_s else (np.nan, np.nan)
        seconds = self.closed_s - self.opened_s
        summary = {"chunks": self.chunks, "steps": self.steps, "seconds": seconds, "cpu_s": cpu_s}
        return {**summary, "p50_ms": float(millis[0]), "p99_ms": float(millis[1]), **extra}
