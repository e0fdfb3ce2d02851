"""`--memory`: what an idle session costs the server, in resident memory, against its raw state size.

A server process opens N sessions (one step each, over streams held open meanwhile) and the parent reads its
RSS from /proc before and after: RSS delta / N. Two server processes, two figures:
- fresh: right after opening, each session still holding its last response for retries (the replay window);
- idle: a session past its replay window. Memory freed by the allocator rarely goes back to the OS, so a burst
  of N openings would leave N responses' worth of RSS behind even once dropped; this server runs with a short
  replay window instead, so responses are dropped during the burst and their memory is reused, as it is for
  sessions that arrive over minutes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelcard import CARD_FILE, spec_from_card
from serving.bench.grid import BenchError, require_model
from serving.bench.host import HostSpec, hosting
from serving.bench.load import run_load

_SWEEP_INTERVAL_S = 0.25
_WARM_SESSIONS = 1000  # opened before the baseline, so one-time allocations (buffers, tables) stay out of it
_FRESH_WINDOW_S = 3600.0  # nothing is dropped while measuring
_IDLE_WINDOW_S = 0.05


@dataclass(frozen=True)
class MemoryOptions:
    """A memory run: `sessions` idle sessions on the model in `model_dir`."""

    model_dir: Path
    sessions: int = 100_000
    channels: int = 16

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.channels < 1:
            raise BenchError("--memory needs sessions >= 1 and channels >= 1")


@dataclass(frozen=True)
class MemoryResult:
    """Resident bytes per session, fresh (replay cache held) and idle (after the replay window)."""

    sessions: int
    layers: int
    hidden: int
    raw_state_bytes: int  # the state row: 4 bytes a float (an LSTM: 2 x layers x hidden x 4)
    budget_bytes: float  # the target: 1.5 x raw + 512
    bytes_per_session_fresh: float  # with the last response held for retries
    bytes_per_session_idle: float  # past the replay window
    open_s: float  # time to open them all (fresh run)

    @property
    def met(self) -> bool:
        """Whether an idle session stays within the budget."""
        return self.bytes_per_session_idle <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        return {**asdict(self), "met": self.met}

    def summary(self) -> str:
        """The figures for a person."""
        raw = self.raw_state_bytes
        return (
            f"{self.sessions} sessions ({self.layers} x {self.hidden} state, raw {raw} B), opened in "
            f"{self.open_s:.1f} s\n"
            f"  fresh (replay cache held): {self.bytes_per_session_fresh:.0f} B/session "
            f"({self.bytes_per_session_fresh / raw:.2f}x raw)\n"
            f"  idle (after the replay window): {self.bytes_per_session_idle:.0f} B/session "
            f"({self.bytes_per_session_idle / raw:.2f}x raw); target <= {self.budget_bytes:.0f} B: "
            f"{'MET' if self.met else 'MISSED'}"
        )


def run_memory(options: MemoryOptions) -> MemoryResult:
    """Open `options.sessions` sessions in fresh server processes and measure their RSS per session."""
    require_model(options.model_dir)
    card = json.loads((options.model_dir / CARD_FILE).read_text())
    spec = spec_from_card(card)
    fresh, open_s = _bytes_per_session(options, _FRESH_WINDOW_S)
    idle, _ = _bytes_per_session(options, _IDLE_WINDOW_S)
    raw = 4 * spec.state_size
    return MemoryResult(
        sessions=options.sessions,
        layers=spec.layers,
        hidden=spec.hidden,
        raw_state_bytes=raw,
        budget_bytes=1.5 * raw + 512,
        bytes_per_session_fresh=fresh,
        bytes_per_session_idle=idle,
        open_s=open_s,
    )


def _bytes_per_session(options: MemoryOptions, replay_window_s: float) -> tuple[float, float]:
    config = {
        "max_sessions": options.sessions + _WARM_SESSIONS,
        "replay_window_s": replay_window_s,
        "sweep_interval_s": _SWEEP_INTERVAL_S,
        "idle_ttl_s": 86400.0,
    }
    settle_s = min(replay_window_s, 1.0) + 2 * _SWEEP_INTERVAL_S
    with hosting(HostSpec("server", options.model_dir, config)) as host:
        _open(host.target, _WARM_SESSIONS, options.channels, lambda: time.sleep(settle_s))
        before = host.rss_bytes()
        after: list[int] = []

        def measure() -> None:  # while the load process holds the sessions, streams open
            time.sleep(settle_s)
            after.append(host.rss_bytes())

        open_s = _open(host.target, options.sessions, options.channels, measure)
        return (after[0] - before) / options.sessions, open_s


def _open(target: str, sessions: int, channels: int, measure: Callable[[], None]) -> float:
    job = {"kind": "open", "target": target, "sessions": sessions, "channels": channels}
    result = run_load(job, measure, lambda: None)
    if result["opened"] != sessions:
        raise BenchError(f"opened {result['opened']} of {sessions} sessions")
    return float(result["seconds"])
