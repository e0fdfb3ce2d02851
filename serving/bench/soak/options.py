"""What a soak runs: its options (light to import: the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving.bench.grid import BenchError

_WARMUP_SHARE = 0.2  # by default the first fifth of the run is warm-up...
_WARMUP_MAX_S = 60.0  # ...but at most a minute


@dataclass(frozen=True)
class SoakOptions:
    """A soak. Either `model_dir` (the soak starts its own server) or `target` (a running server) is needed;
    a target's resident memory is read from its /metrics at `metrics_url`."""

    model_dir: Path | None = None
    target: str | None = None  # HOST:PORT of a running server
    metrics_url: str | None = None  # the target's http://HOST:PORT/metrics (process_resident_memory_bytes)
    duration_s: float = 600.0
    sessions: int = 48  # sessions in progress at once; each ends and is followed by a new one
    connections: int = 8  # shared connections, one Stream each; a session that reconnects opens its own
    think_ms: float = 100.0  # mean pause between a session's requests: keeps the load moderate
    idle_ttl_s: float = 3.0  # the soak's own server's; a target's comes from GetModelInfo
    sample_s: float = 5.0  # how often the server's resident memory is read
    warmup_s: float | None = None  # None: a fifth of the run, at most a minute
    max_drift_pct: float = 10.0  # resident memory may grow this much after the warm-up
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.target is None):
            raise BenchError("give a model directory to serve, or --target HOST:PORT of a running server")
        if self.target is not None and not self.metrics_url:
            raise BenchError("--target needs --metrics-url http://HOST:PORT/metrics, to read its memory")
        if min(self.sessions, self.connections) < 1:
            raise BenchError("--sessions and --connections must be >= 1")
        if min(self.duration_s, self.idle_ttl_s, self.sample_s) <= 0 or self.think_ms < 0:
            raise BenchError("the duration, idle TTL and sample interval must be > 0, the think time >= 0")
        if not 0 <= self.warmup <= self.duration_s - self.sample_s:
            raise BenchError("the warm-up must leave at least one sample interval of the run after it")

    @property
    def warmup(self) -> float:
        """Seconds of warm-up: memory is judged from its end on."""
        if self.warmup_s is not None:
            return self.warmup_s
        return min(_WARMUP_MAX_S, _WARMUP_SHARE * self.duration_s)
