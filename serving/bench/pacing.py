"""Audio streams paced at real time, for the audio rows (`serving.bench.audio`): when each stream's chunks are
due, which of them complete a window, and the tally of a measured interval (window latencies and drops).

Every stream sends one chunk of `chunk` samples per period (320 samples: 20 ms at 16 kHz). Streams start at
staggered times over one cycle of window phases (a 320-sample chunk meets a 512-sample window at 8 phases),
so at any tick the streams are at different points of their windows and about the same share of them
completes one: without it, every stream would complete its windows on the same ticks. A gateway's streams
(`aligned`) start on the ticks, since the gateway sends every stream's chunks of a tick as one frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from serving.bench.wire import Job, say

LEAD_S = 0.05  # from a load process's start of pacing to its first tick: its set-up is no stream's delay


class Due(NamedTuple):
    """A stream's chunk `number` (from 0), due `due_s` seconds after the pacing's start."""

    stream: int
    number: int
    due_s: float


@dataclass(frozen=True)
class Pacing:
    """N streams of `rate` Hz audio, each a chunk of `chunk` samples per period, windows of `window`."""

    streams: int
    chunk: int
    rate: int
    window: int
    aligned: bool  # every chunk due on a tick (a gateway's): streams start on ticks

    @property
    def period_s(self) -> float:
        """Seconds between a stream's chunks."""
        return self.chunk / self.rate

    @property
    def cycle_s(self) -> float:
        """Seconds over which the streams' starts are spread: one period per window phase a chunk meets."""
        return self.window // math.gcd(self.chunk, self.window) * self.period_s

    def windows(self, index: int) -> int:
        """Windows a stream's chunk `index` completes."""
        offset = index * self.chunk
        return (offset + self.chunk) // self.window - offset // self.window

    @property
    def window_s(self) -> float:
        """Seconds of audio in a window: the latency bound, and how far behind a stream may fall."""
        return self.window / self.rate

    def ticks(self) -> Iterator[list[Due]]:
        """Each period's chunks, in the order they are due (without end)."""
        starts = [i * self.cycle_s / self.streams for i in range(self.streams)]
        # The tick a stream starts on, and how far into each period its chunks are due.
        first = [math.floor(start / self.period_s + 1e-9) for start in starts]
        phase = [start - tick * self.period_s for start, tick in zip(starts, first, strict=True)]
        phase = [0.0] * self.streams if self.aligned else phase
        order = sorted(range(self.streams), key=lambda stream: phase[stream])
        tick = 0
        while True:
            at = tick * self.period_s
            yield [Due(s, tick - first[s], at + phase[s]) for s in order if first[s] <= tick]
            tick += 1


def wait_s(due_s: float, now_s: float) -> float:
    """How long a sender sleeps before sending what is due at `due_s` (0: send now)."""
    return max(due_s - now_s, 0.0)


@dataclass
class Tally:
    """The windows of the chunks due in the measured interval: their latencies (due to answer) and drops.

    A chunk is due when a stream paced at real time has it. The process that takes the streams in (the
    gateway, the Stream client, silero's loop) taking a chunk more than `behind_s` (one window) after that has
    fallen that far behind real time: the chunk counts as dropped, as does a window of the interval never
    answered. Opening and closing tell the parent process (`start`, `stop`), which reads the server's CPU."""

    behind_s: float
    latencies_s: list[float] = field(default_factory=list)
    owed: int = 0  # windows of the chunks due in the interval
    late: int = 0  # chunks of the interval taken in more than `behind_s` late
    in_flight: int = 0  # messages (frames, chunks) sent and not yet answered, the interval's or not
    opened_s: float = math.inf
    closed_s: float = math.inf

    def open(self, at_s: float | None = None) -> None:
        """Start the interval at `at_s` (perf_counter seconds; now by default) and tell the parent."""
        self.opened_s = time.perf_counter() if at_s is None else at_s
        say("start")

    def close(self, at_s: float | None = None) -> None:
        """End the interval at `at_s` (now by default) and tell the parent."""
        self.closed_s = time.perf_counter() if at_s is None else at_s
        say("stop")

    def measured(self, due_s: float) -> bool:
        """Whether a chunk due at `due_s` (perf_counter seconds) is the interval's."""
        return self.opened_s <= due_s < self.closed_s

    def over(self, due_s: float) -> bool:
        """Whether a chunk due at `due_s` comes after the interval: a sender stops there, so that once what
        it sent is answered, nothing more is in flight."""
        return due_s >= self.closed_s

    def sent(self, due_s: float, sent_s: float, windows: int, chunks: int = 1) -> None:
        """One message of `chunks` chunks due at `due_s`, completing `windows` windows, was taken in (sent,
        or run) at `sent_s`."""
        self.in_flight += 1
        if self.measured(due_s):
            self.owed += windows
            self.late += chunks if sent_s - due_s > self.behind_s else 0

    def answered(self, due_s: float, windows: int, now_s: float) -> None:
        """One message's answer: the probabilities of the `windows` windows its chunks, due at `due_s`,
        completed arrived at `now_s`."""
        self.in_flight -= 1
        if self.measured(due_s):
            self.latencies_s.extend([now_s - due_s] * windows)

    @property
    def settled(self) -> bool:
        """Everything sent answered (once the senders have stopped: every window of the interval too)."""
        return self.in_flight == 0

    def result(self, cpu_s: float) -> Job:
        """The interval's figures as the load process's JSON; `cpu_s`: its own CPU over the interval."""
        millis = np.percentile(self.latencies_s, (50, 99)) * 1000 if self.latencies_s else (math.nan,) * 2
        return {
            "windows": self.owed,
            "answered": len(self.latencies_s),
            "dropped": self.late + self.owed - len(self.latencies_s),
            "seconds": self.closed_s - self.opened_s,
            "cpu_s": cpu_s,
            "p50_ms": float(millis[0]),
            "p99_ms": float(millis[1]),
        }
