"""The metrics module on a fresh registry each test, the per-RPC interceptor on a real server, and the
quantile arithmetic of the /metrics reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from serving_harness import RawStream, chunk, connect, make_inputs, rejected, running, scrape

from serving.client.scrape import histogram_quantile
from serving.server.metrics import LATENCY_BUCKETS_S, ConveyorMetrics
from serving.wire import pb

pytestmark = pytest.mark.timeout(30)


def test_histograms_resolve_sub_millisecond_times() -> None:
    assert LATENCY_BUCKETS_S[0] == 50e-6 and LATENCY_BUCKETS_S[-1] == 10.0
    assert sum(bound < 1e-3 for bound in LATENCY_BUCKETS_S) == 4


def test_a_frames_reports_equal_as_many_single_reports() -> None:
    """Counting a frame's chunks in one call writes what one call per chunk writes, bucket for bucket."""
    once, each = CollectorRegistry(), CollectorRegistry()
    bulk, single = ConveyorMetrics(once), ConveyorMetrics(each)
    version = ("language", "1")
    bulk_version, single_version = bulk.for_version(version), single.for_version(version)
    for latency, chunks in ((0.0003, 64), (0.00005, 3), (0.004, 1), (20.0, 2)):
        bulk.chunk_answered(latency, chunks=chunks, labels=version)
        bulk.observe_queue_wait(latency, chunks)
        bulk_version.chunks_applied(chunks, chunks)
        for _ in range(chunks):
            single.chunk_answered(latency, labels=version)
            single.observe_queue_wait(latency)
            single_version.chunks_applied(chunks)
    bulk.chunk_answered(0.001, "ABORTED", chunks=5)
    for _ in range(5):
        single.chunk_answered(0.001, "ABORTED")

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(once) == pytest.approx(samples(each))
    assert (
        once.get_sample_value("conveyor_chunk_latency_seconds_count", {"model": "language", "version": "1"})
        == 70
    )


def test_every_report_lands_in_its_metric() -> None:
    registry = CollectorRegistry()
    metrics = ConveyorMetrics(registry)
    version = ("language", "2")
    metrics.version_state(version, "f00d", "loading")
    metrics.version_state(version, "f00d", "ready")
    metrics.set_limits(100, 600.0)
    metrics.track_sessions(version, lambda: 3)
    metrics.track_state_bytes(lambda: 768)
    metrics.track_draining(version, lambda: 12.5)
    metrics.observe_queue_wait(0.0002)
    metrics.observe_batch(8, 0.0004)
    sessions = metrics.for_version(version)
    sessions.session_started()
    sessions.session_ended("ttl", 120.0, 42)
    sessions.chunks_applied(5)
    metrics.chunk_answered(0.0003, labels=version)
    metrics.chunk_answered(0.0001, "ABORTED", labels=version)
    metrics.chunk_answered(0.0001, "ABORTED")  # failed before it reached a version: no version labels
    metrics.rpc_handled("conveyor.v1.Conveyor", "Step", "OK", 0.001)

    def value(metric: str, **labels: str) -> float | None:
        return registry.get_sample_value(metric, labels)

    ours = {"model": "language", "version": "2"}
    info = {"name": "language", "version": "2", "fingerprint": "f00d"}
    assert value("conveyor_model_info", state="ready", **info) == 1
    assert (
        value("conveyor_model_info", state="loading", **info) is None
    )  # one series: the version's state now
    assert value("conveyor_sessions_active", **ours) == 3 and value("conveyor_state_bytes") == 768
    assert value("conveyor_sessions_max") == 100 and value("conveyor_model_drain_deadline_seconds") == 600
    assert value("conveyor_model_draining_seconds", **ours) == 12.5
    assert value("conveyor_queue_wait_seconds_bucket", le="0.00025") == 1
    assert (
        value("conveyor_batch_size_bucket", le="8.0") == 1
        and value("conveyor_batch_size_bucket", le="4.0") == 0
    )
    assert value("conveyor_inference_seconds_sum") == pytest.approx(0.0004)
    assert value("conveyor_sessions_started_total", **ours) == 1
    assert value("conveyor_sessions_ended_total", reason="ttl", **ours) == 1
    for reason in ("capacity", "model_retired"):  # every reason is exported from 0
        assert value("conveyor_sessions_ended_total", reason=reason, **ours) == 0
    assert (
        value("conveyor_session_duration_seconds_sum", **ours) == 120
        and value("conveyor_session_timesteps_sum", **ours) == 42
    )
    assert value("conveyor_timesteps_total", **ours) == 5
    assert value("conveyor_chunk_timesteps_count", **ours) == 1
    assert value("conveyor_chunk_latency_seconds_count", **ours) == 2
    assert value("conveyor_chunk_latency_seconds_count", model="", version="") == 1
    metrics.untrack_version(version)  # retired: its gauges go
    assert value("conveyor_sessions_active", **ours) is None
    assert value("conveyor_model_draining_seconds", **ours) is None
    assert value("conveyor_chunk_errors_total", code="ABORTED") == 2
    labels = {"grpc_service": "conveyor.v1.Conveyor", "grpc_method": "Step"}
    assert value("grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value("grpc_server_handling_seconds_count", **labels) == 1


def test_the_interceptor_records_each_rpc_with_its_status_code(token_artifact: Path) -> None:
    x = make_inputs(token_artifact, 4, np.random.default_rng(0))
    with running(token_artifact) as server:
        with connect(server) as stub:
            stub.Step(chunk("rpc", x, 0, start=True), timeout=10)
            rejected(stub.Step, chunk("rpc", x, 0, start=True, end=True))  # ALREADY_EXISTS
            rejected(stub.Snapshot, pb.SnapshotRequest(session_id="nobody"))  # NOT_FOUND
            stream = RawStream(stub)
            assert stream.call(chunk("nobody", x, 0)).error.code == 5  # in band: the stream itself is OK
            stream.close()
        _, samples = scrape(server)

    def handled(method: str, code: str) -> float:
        labels = f'grpc_code="{code}",grpc_method="{method}",grpc_service="conveyor.v1.Conveyor"'
        return samples.get(f"grpc_server_handled_total{{{labels}}}", 0.0)

    assert (handled("Step", "OK"), handled("Step", "ALREADY_EXISTS")) == (1, 1)
    assert (handled("Snapshot", "NOT_FOUND"), handled("Stream", "OK")) == (1, 1)
    stream_count = (
        'grpc_server_handling_seconds_count{grpc_method="Stream",grpc_service="conveyor.v1.Conveyor"}'
    )
    assert samples[stream_count] == 1
    assert samples['conveyor_chunk_errors_total{code="ALREADY_EXISTS"}'] == 1
    assert samples['conveyor_chunk_errors_total{code="NOT_FOUND"}'] == 1


def test_quantile_interpolates_within_buckets() -> None:
    buckets = [(0.001, 50.0), (0.002, 90.0), (0.004, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(0.0015)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.0038)
    # Past the last finite bound: that bound, as Prometheus answers.
    assert histogram_quantile([(0.001, 0.0), (math.inf, 4.0)], 0.5) == pytest.approx(0.001)
    assert math.isnan(histogram_quantile([(math.inf, 0.0)], 0.5))
