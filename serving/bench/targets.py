"""The throughput targets, checked on the rows of one run (ratios within a run, never across runs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serving.bench.grid import Row


@dataclass(frozen=True)
class Check:
    """One target: `actual` against `bound` (a floor when `at_least`, else a ceiling); None: not measured."""

    name: str
    actual: float | None
    bound: float
    at_least: bool

    @property
    def met(self) -> bool | None:
        """True or False; None when the run lacks the rows to tell."""
        if self.actual is None:
            return None
        return self.actual >= self.bound if self.at_least else self.actual <= self.bound

    def line(self) -> str:
        """The check as one line: verdict, name, actual and bound."""
        verdict = {True: "MET   ", False: "MISSED", None: "n/a   "}[self.met]
        actual = "-" if self.actual is None else f"{self.actual:.3g}"
        return f"{verdict} {self.name}: {actual} ({'>=' if self.at_least else '<='} {self.bound:g})"


class _Rows:
    def __init__(self, rows: Sequence[Row]) -> None:
        self._rows = {(r.mode, r.sessions, r.chunk_steps, r.history_steps): r for r in rows}

    def get(self, mode: str, sessions: int, steps: int = 1, history: int = 0) -> Row | None:
        return self._rows.get((mode, sessions, steps, history))

    def ratio(self, num: Row | None, den: Row | None, field: Callable[[Row], float]) -> float | None:
        return None if num is None or den is None else field(num) / field(den)

    @staticmethod
    def figure(row: Row | None, field: Callable[[Row], float | None]) -> float | None:
        return None if row is None else field(row)


def check_targets(rows: Sequence[Row]) -> list[Check]:
    """Every target of the brief that `rows` can tell, met or not."""
    r = _Rows(rows)
    b64, b64_32, b1 = r.get("batched", 64), r.get("batched", 64, 32), r.get("batched", 1)
    durable64, one64 = r.get("durable", 64), r.get("one_stream", 64)
    frames64, frames256 = r.get("frames", 64), r.get("frames", 256)
    stateful_1000, stateless_1000 = r.get("batched", 1, 1, 1000), r.get("stateless", 1, 1, 1000)
    echo1, floor1 = r.get("echo", 1), r.get("ort_floor", 1)
    floors = (
        None if echo1 is None or floor1 is None or b1 is None else b1.p50_ms / (echo1.p50_ms + floor1.p50_ms)
    )

    def steps(row: Row) -> float:
        return row.timesteps_per_s

    def p50(row: Row) -> float:
        return row.p50_ms

    def cpu(row: Row) -> float:
        return row.cpu_s_per_1k_steps or math.nan

    return [
        Check(
            "64 sessions x 1 step: batched / unbatched steps/s",
            r.ratio(b64, r.get("unbatched", 64), steps),
            3,
            True,
        ),
        Check(
            "64 sessions x 1 step: batched / echo messages/s",
            r.ratio(b64, r.get("echo", 64), lambda row: row.chunks_per_s),
            0.7,
            True,
        ),
        Check("64 sessions x 1 step: batched steps/s", r.figure(b64, steps), 14000, True),
        Check("64 sessions x 1 step: batched p99 ms", r.figure(b64, lambda row: row.p99_ms), 10, False),
        Check(
            "64 sessions x 32 steps: batched / ort_floor steps/s",
            r.ratio(b64_32, r.get("ort_floor", 64, 32), steps),
            0.4,
            True,
        ),
        Check(
            "64 sessions x 1 step: one stream / 16 channels server CPU per chunk",
            r.ratio(one64, b64, cpu),
            1,
            False,
        ),
        Check(
            "64 sessions x 1 step, one stream: server CPU ms per chunk",
            r.figure(one64, lambda row: row.cpu_s_per_1k_steps),
            0.15,
            False,
        ),
        Check(
            "64 sessions x 1 step, one stream: steps/s",
            r.figure(one64, steps),
            5000,
            True,
        ),
        Check(
            "64 sessions x 1 step: frames steps/s",
            r.figure(frames64, steps),
            30000,
            True,
        ),
        Check("64 sessions x 1 step: frames / batched steps/s", r.ratio(frames64, b64, steps), 4, True),
        Check(
            "256 sessions x 1 step: frames steps/s",
            r.figure(frames256, steps),
            50000,
            True,
        ),
        Check(
            "256 sessions x 1 step: frames / ort_floor (one batch of 256) steps/s",
            r.ratio(frames256, r.get("ort_floor", 256), steps),
            0.33,
            True,
        ),
        Check("1 session x 1 step: batched p50 / (echo p50 + ort_floor p50)", floors, 1.3, False),
        Check(
            "history 1000: stateless p50 / stateful p50",
            r.ratio(stateless_1000, stateful_1000, p50),
            20,
            True,
        ),
        Check(
            "stateless p50: history 1000 / history 100",
            r.ratio(stateless_1000, r.get("stateless", 1, 1, 100), p50),
            5,
            True,
        ),
        Check(
            "64 sessions x 1 step: durable (Redis store) / batched (in memory) steps/s",
            r.ratio(durable64, b64, steps),
            0.6,
            True,
        ),
        Check(
            "stateful server CPU per step: history 1000 / 0 (flat)",
            r.ratio(stateful_1000, b1, cpu),
            1.25,
            False,
        ),
    ]


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check."""
    return "\n".join(check.line() for check in checks)
