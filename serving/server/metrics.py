"""Every Prometheus metric of the server, in one place, on an injectable registry. Base units; no session ids.

Per-chunk latency is measured in the servicer's stream loop and in the batcher, not in an interceptor: on a
streaming RPC an interceptor sees the whole stream. The interceptor (`serving.server.interceptor`) records the
per-RPC metrics.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A 1-2.5-5 series from 50 µs, so that sub-millisecond chunks and batches land in distinct buckets, to 10 s.
LATENCY_BUCKETS_S = tuple(
    round(m * 10.0**e, 6) for e in range(-5, 2) for m in (1, 2.5, 5) if 50e-6 <= m * 10.0**e <= 10
)
RPC_BUCKETS_S = (*LATENCY_BUCKETS_S, 30.0, 60.0, 300.0, 1800.0, 3600.0)  # streams live long
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIMESTEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
SESSION_DURATION_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
SESSION_TIMESTEP_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
END_REASONS = ("end", "ttl", "lifetime", "capacity", "shutdown", "model_retired")
VERSION_LABELS = ("model", "version")  # on every metric of one model version's sessions and chunks
# A model version as its metrics label it: (model name, version number as text). Chunks that failed before
# they reached a version (no such model, say) carry empty labels, which Prometheus shows as none.
Labels = tuple[str, str]
NO_VERSION: Labels = ("", "")
HELD_KINDS = ("state", "replay", "ended_replay", "stream")


class _Histogram(Histogram):
    """A histogram that takes one value observed many times in one call: a frame's chunks share their
    latency and wait, and observing each alone would cost a lock per bucket and chunk.

    It writes the histogram's own buckets and sum (attributes of prometheus_client, pinned in pyproject.toml;
    tests/test_metrics.py checks the exposition equals that of as many `observe` calls)."""

    def observe_many(self, amount: float, count: int) -> None:
        """`observe(amount)` `count` times."""
        if count == 1:
            self.observe(amount)
            return
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        self._sum.inc(amount * count)
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(count)


class ConveyorMetrics:
    """The server's metrics; implements the batcher's and the engine's metrics protocols."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> _Histogram:
            return _Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self._handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed, by status code.",
            ("grpc_service", "grpc_method", "grpc_code"),
            registry=registry,
        )
        self._handling = histogram(
            "grpc_server_handling_seconds",
            "RPC duration; for a stream, its lifetime.",
            RPC_BUCKETS_S,
            "grpc_service",
            "grpc_method",
        )
        self._chunk_latency = histogram(
            "conveyor_chunk_latency_seconds", "Chunk receipt to response.", LATENCY_BUCKETS_S, *VERSION_LABELS
        )
        self._queue_wait = histogram(
            "conveyor_queue_wait_seconds", "Chunk wait for its batch to start.", LATENCY_BUCKETS_S
        )
        self._inference = histogram("conveyor_inference_seconds", "One runner call.", LATENCY_BUCKETS_S)
        self._batch_size = histogram("conveyor_batch_size", "Chunks per runner call.", BATCH_BUCKETS)
        self._chunk_steps = histogram(
            "conveyor_chunk_timesteps", "Timesteps per applied chunk.", TIMESTEP_BUCKETS, *VERSION_LABELS
        )
        self._sessions = Gauge(
            "conveyor_sessions_active", "Live sessions.", VERSION_LABELS, registry=registry
        )
        self._capacity = Gauge("conveyor_sessions_max", "Session capacity (max_sessions).", registry=registry)
        self._state_bytes = Gauge(
            "conveyor_state_bytes",
            "Bytes of recurrent state (h, c) held for live sessions.",
            registry=registry,
        )
        self._held = Gauge(
            "conveyor_held_bytes",
            "Bytes held for clients, by kind: state (allocated), replay (live sessions' last responses), "
            "ended_replay (ended sessions' last responses), stream (streams' unanswered and unsent chunks).",
            ("kind",),
            registry=registry,
        )
        self._started = Counter(
            "conveyor_sessions_started", "Sessions created.", VERSION_LABELS, registry=registry
        )
        self._ended = Counter(
            "conveyor_sessions_ended",
            "Sessions ended, by reason.",
            (*VERSION_LABELS, "reason"),
            registry=registry,
        )
        self._timesteps = Counter(
            "conveyor_timesteps", "Timesteps applied.", VERSION_LABELS, registry=registry
        )
        self._errors = Counter(
            "conveyor_chunk_errors", "Failed chunks, by status code.", ("code",), registry=registry
        )
        self._model = Gauge(
            "conveyor_model_info",
            "Each model version the server holds, by state (loading, ready, draining, retired, failed).",
            ("name", "version", "fingerprint", "state"),
            registry=registry,
        )
        self._model_labels: dict[Labels, tuple[str, str, str, str]] = {}
        self._draining = Gauge(
            "conveyor_model_draining_seconds",
            "How long a draining model version has been draining (it takes no new sessions).",
            VERSION_LABELS,
            registry=registry,
        )
        self._drain_deadline = Gauge(
            "conveyor_model_drain_deadline_seconds",
            "How long a version drains before its sessions left end (model_retired).",
            registry=registry,
        )
        self._session_duration = histogram(
            "conveyor_session_duration_seconds",
            "Session age when it ended.",
            SESSION_DURATION_BUCKETS_S,
            *VERSION_LABELS,
        )
        self._session_steps = histogram(
            "conveyor_session_timesteps",
            "Timesteps a session consumed, when it ended.",
            SESSION_TIMESTEP_BUCKETS,
            *VERSION_LABELS,
        )
        self._store_round_trip = histogram(
            "conveyor_store_round_trip_seconds", "One pipeline to the session store.", LATENCY_BUCKETS_S
        )
        self._store_operations = histogram(
            "conveyor_store_operations", "Session-store calls per round trip.", BATCH_BUCKETS
        )
        self._store_errors = Counter(
            "conveyor_store_errors",
            "Failed session-store round trips, by kind.",
            ("kind",),
            registry=registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def version_state(self, labels: Labels, fingerprint: str, state: str) -> None:
        """Publish a model version as `conveyor_model_info{name, version, fingerprint, state} 1` (its
        series of an earlier state gone)."""
        previous = self._model_labels.pop(labels, None)
        if previous is not None:
            self._model.remove(*previous)
        self._model_labels[labels] = (*labels, fingerprint, state)
        self._model.labels(*labels, fingerprint, state).set(1)

    def for_version(self, labels: Labels) -> VersionMetrics:
        """The metrics of one model version's sessions and chunks (every end reason shown from 0)."""
        ended = {reason: self._ended.labels(*labels, reason) for reason in END_REASONS}
        started = self._started.labels(*labels)
        started.inc(0)
        return VersionMetrics(
            started,
            ended,
            self._session_duration.labels(*labels),
            self._session_steps.labels(*labels),
            self._timesteps.labels(*labels),
            self._chunk_steps.labels(*labels),
        )

    def set_limits(self, capacity: int, drain_deadline_s: float) -> None:
        """Publish the session capacity (server-wide) and the drain deadline."""
        self._capacity.set(capacity)
        self._drain_deadline.set(drain_deadline_s)

    def track_state_bytes(self, read: Callable[[], int]) -> None:
        """Read `conveyor_state_bytes` (every live session's recurrent state) from `read` at scrape time."""
        self._state_bytes.set_function(read)

    def track_sessions(self, labels: Labels, count: Callable[[], int]) -> None:
        """Read a version's `conveyor_sessions_active` from `count` at scrape time, never stale."""
        self._sessions.labels(*labels).set_function(count)

    def track_draining(self, labels: Labels, seconds: Callable[[], float]) -> None:
        """Read a draining version's `conveyor_model_draining_seconds` from `seconds` at scrape time."""
        self._draining.labels(*labels).set_function(seconds)

    def untrack_version(self, labels: Labels) -> None:
        """A retired version: its live gauges go (its counters stay, as counters do)."""
        for gauge in (self._sessions, self._draining):
            with contextlib.suppress(KeyError):  # never had that series (retired without draining)
                gauge.remove(*labels)

    def track_held_bytes(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Read `conveyor_held_bytes{kind}` from `read` (bytes by each of `HELD_KINDS`) at scrape time."""
        for kind in HELD_KINDS:
            self._held.labels(kind).set_function(functools.partial(_read_kind, read, kind))

    def observe_queue_wait(self, seconds: float, chunks: int = 1) -> None:
        """Time `chunks` chunks (one, or a frame's) waited between submission and the start of their batch."""
        self._queue_wait.observe_many(seconds, chunks)

    def observe_batch(self, size: int, inference_s: float) -> None:
        """One runner call: rows in the batch and the call's duration."""
        self._batch_size.observe(size)
        self._inference.observe(inference_s)

    def observe_store_round_trip(self, seconds: float, operations: int) -> None:
        """One pipeline of `operations` session-store calls took `seconds`."""
        self._store_round_trip.observe(seconds)
        self._store_operations.observe(operations)

    def store_error(self, kind: str) -> None:
        """A session-store round trip failed: "unreachable" or "refused"."""
        self._child(self._store_errors, kind).inc()

    def chunk_answered(
        self,
        latency_s: float,
        error_code: str | None = None,
        chunks: int = 1,
        labels: Labels = NO_VERSION,
    ) -> None:
        """`chunks` chunks (one, or a frame's) of the version `labels` were answered `latency_s` after
        receipt; `error_code` names a failure's gRPC code."""
        self._child(self._chunk_latency, *labels).observe_many(latency_s, chunks)
        if error_code is not None:
            self._child(self._errors, error_code).inc(chunks)

    def rpc_handled(self, service: str, method: str, code: str, seconds: float) -> None:
        """An RPC finished with status `code` after `seconds`."""
        self._child(self._handled, service, method, code).inc()
        self._child(self._handling, service, method).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        # Binding labels costs a lock and a dict lookup inside prometheus_client; keep the bound child.
        key = (str(id(metric)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


@dataclass(frozen=True)
class VersionMetrics:
    """One model version's session and chunk metrics, their labels bound once; implements the engine's
    metrics protocol."""

    started: Any
    ended: Mapping[str, Any]  # by reason
    duration: Any
    steps: Any
    timesteps: Any
    chunk_steps: Any

    def session_started(self) -> None:
        """A session was created."""
        self.started.inc()

    def session_ended(self, reason: str, duration_s: float, steps: int) -> None:
        """A session ended."""
        self.ended[reason].inc()
        self.duration.observe(duration_s)
        self.steps.observe(steps)

    def chunks_applied(self, timesteps: int, chunks: int = 1) -> None:
        """`chunks` chunks of `timesteps` each were run and their states committed."""
        if chunks:
            self.timesteps.inc(timesteps * chunks)
            self.chunk_steps.observe_many(timesteps, chunks)


def _read_kind(read: Callable[[], Mapping[str, int]], kind: str) -> float:
    return read()[kind]
