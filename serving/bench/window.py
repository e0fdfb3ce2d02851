"""What a load process measures of a cell: the chunks and timesteps answered while its window is open, and
their latencies; the window's opening and closing are told to the parent (which reads the server's CPU).
Parts measured side by side (`Windows`) each count in a window of their own, opened and closed together."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serving.bench.wire import Job, say

_SETTLE_POLL_S = 0.01


class Interval(Protocol):
    """What a measured interval counts: a cell's `Window`, or the audio rows' `serving.bench.pacing.Tally`."""

    def open(self) -> None:
        """Start counting, and tell the parent."""

    def close(self) -> None:
        """Stop counting, and tell the parent."""

    @property
    def settled(self) -> bool:
        """Whether everything the interval counts has been answered."""

    def result(self, cpu_s: float) -> Job:
        """The figures, with `cpu_s`, the load process's CPU over the interval."""


@dataclass
class Window:
    """Counts chunks and keeps latencies of the responses that arrive while it is open; tells the parent when
    it opens and closes unless it is one of several (`tell` False)."""

    latencies_s: list[float] = field(default_factory=list)
    chunks: int = 0
    steps: int = 0
    is_open: bool = False
    opened_s: float = 0.0
    closed_s: float = 0.0
    tell: bool = True

    def record(self, latency_s: float, steps: int, chunks: int = 1) -> None:
        if self.is_open:
            self.latencies_s.append(latency_s)
            self.chunks += chunks
            self.steps += steps

    def open(self) -> None:
        self.opened_s, self.is_open = time.perf_counter(), True
        if self.tell:
            say("start")

    def close(self) -> None:
        self.closed_s, self.is_open = time.perf_counter(), False
        if self.tell:
            say("stop")

    @property
    def settled(self) -> bool:
        """Always: a window counts answers as they arrive, so none is owed once it closes."""
        return True

    def result(self, cpu_s: float, **extra: Any) -> Job:
        millis = np.percentile(self.latencies_s, (50, 99)) * 1000 if self.latencies_s else (np.nan, np.nan)
        seconds = self.closed_s - self.opened_s
        summary = {"chunks": self.chunks, "steps": self.steps, "seconds": seconds, "cpu_s": cpu_s}
        return {**summary, "p50_ms": float(millis[0]), "p99_ms": float(millis[1]), **extra}


class Windows:
    """The windows of parts measured side by side, opened and closed together (told to the parent once)."""

    def __init__(self, parts: int) -> None:
        self.parts = [Window(tell=False) for _ in range(parts)]

    def open(self) -> None:
        for window in self.parts:
            window.open()
        say("start")

    def close(self) -> None:
        for window in self.parts:
            window.close()
        say("stop")

    @property
    def settled(self) -> bool:
        """Always, as a `Window` is."""
        return True

    def result(self, cpu_s: float) -> Job:
        """Every part's answers together, and under `parts` each part's own figures."""
        first = self.parts[0]
        together = Window(
            latencies_s=[latency for window in self.parts for latency in window.latencies_s],
            chunks=sum(window.chunks for window in self.parts),
            steps=sum(window.steps for window in self.parts),
            opened_s=first.opened_s,
            closed_s=first.closed_s,
        )
        return together.result(cpu_s, parts=[window.result(cpu_s) for window in self.parts])


async def run_window(
    drivers: list[asyncio.Task[None]],
    interval: Interval,
    warmup_s: float,
    seconds: float,
    settle_s: float = 0.0,
) -> Job:
    """Let `drivers` (tasks that only end by failing) run `warmup_s`, count `seconds` in `interval`, then
    wait up to `settle_s` for what it is still owed; its result, with this process's CPU over the interval."""
    try:
        _raise_failed(await asyncio.wait(drivers, timeout=warmup_s, return_when=asyncio.FIRST_COMPLETED))
        cpu_s = time.process_time()
        interval.open()
        done = await asyncio.wait(drivers, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        interval.close()
        cpu_s = time.process_time() - cpu_s
        _raise_failed(done)
        deadline = time.perf_counter() + settle_s
        while not interval.settled and time.perf_counter() < deadline:
            _raise_failed(await asyncio.wait(drivers, timeout=_SETTLE_POLL_S))
        return interval.result(cpu_s)
    finally:
        for driver in drivers:
            driver.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)


def _raise_failed(waited: tuple[set[asyncio.Task[None]], set[asyncio.Task[None]]]) -> None:
    for task in waited[0]:
        task.result()  # a driver only ends by failing: raise its error
