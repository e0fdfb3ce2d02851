"""Every Grafana panel query returns data from a real Prometheus scraping a real Conveyor server under load.

Prometheus is Debian's 2.42 binary (`apt-get install prometheus`), started here as a local process on a
free loopback port with deploy/prometheus/rules.yml loaded, so the recording rules the dashboard reads are
evaluated on the server's real metrics. A dashboard query that names a metric the server does not export, a
typo in a label, or a rule that never produces a series fails here rather than as an empty panel.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "conveyor.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Grafana's macros, as Grafana would expand them for a short range.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
DATA_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(), reason="prometheus is not installed (apt-get install -y prometheus)"
)


@dataclass(frozen=True)
class Target:
    panel: str
    legend: str
    expr: str


def dashboard_targets() -> list[Target]:
    """Every query of every panel in the provisioned dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        Target(panel["title"], target.get("legendFormat", ""), target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Load:
    """Background traffic: several sessions at once (so batches form), ends, and one NOT_FOUND per round."""

    def __init__(self, target: str, vocabulary_size: int, workers: int = 4) -> None:
        self._target, self._vocabulary_size = target, vocabulary_size
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self, worker: int) -> None:
        from serving.client import ConveyorClient, ConveyorError

        rng = np.random.default_rng(worker)
        with ConveyorClient(self._target) as client:
            client.wait_for_ready(timeout_s=10)
            while not self._stop.is_set():
                with client.session() as session:
                    for _ in range(5):
                        size = int(rng.integers(1, 16))
                        session.send(rng.integers(0, self._vocabulary_size, size=size, dtype=np.int64))
                # A chunk for a session that was never started: NOT_FOUND, by contract.
                with contextlib.suppress(ConveyorError):
                    client.attach(f"never-started-{worker}", 0).send(np.array([1], dtype=np.int64))
                self._stop.wait(0.02)


@dataclass(frozen=True)
class Stack:
    prometheus_url: str
    exported: frozenset[str]  # metric names on the server's /metrics page


@pytest.fixture(scope="module")
def stack(token_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Conveyor server under load, scraped every second by a Prometheus that evaluates rules.yml. Mid
    rollout: version 2 of its model takes the load while version 1 drains, one session left on it, so that
    the panels of versions have both to show."""
    from prometheus_client import CollectorRegistry

    from serving.client import ConveyorClient
    from serving.server.app import build_server
    from serving.server.config import ServerConfig

    repository = tmp_path_factory.mktemp("models")
    shutil.copytree(token_artifact, repository / "language" / "1")
    config = ServerConfig(models_dir=repository, port=0, metrics_port=0, max_delay_ms=1.0)
    server = build_server(config, registry=CollectorRegistry())
    with ConveyorClient(f"127.0.0.1:{server.port}") as client:
        client.session("left-on-1").send(np.array([1, 2, 3], dtype=np.int64))  # left open: it drains
    shutil.copytree(token_artifact, repository / "language" / "2")
    server.rescan()
    workdir = tmp_path_factory.mktemp("prometheus")
    prometheus_config = workdir / "prometheus.yml"
    prometheus_config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "conveyor",
                        "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = _free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={prometheus_config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    vocabulary_size = int(json.loads((token_artifact / "model.json").read_text())["input"]["size"])
    try:
        _wait_ready(url, process, workdir / "prometheus.log")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as page:
            exported = frozenset(
                line.split()[2] for line in page.read().decode().splitlines() if line.startswith("# TYPE ")
            )
        with Load(f"127.0.0.1:{server.port}", vocabulary_size):
            yield Stack(url, exported)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        server.stop(0)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus was not ready within 30 s:\n{log.read_text()[-3000:]}")


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    reply = _get_json(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert reply["status"] == "success", reply
    assert reply["data"]["resultType"] == "vector", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [value for sample in result if math.isfinite(value := float(sample["value"][1]))]


def _base_name(metric: str) -> str:
    return re.sub(r"_(total|bucket|count|sum|created)$", "", metric)


def test_rules_and_dashboard_name_only_exported_metrics(stack: Stack) -> None:
    text = RULES.read_text() + DASHBOARD.read_text()
    named = {_base_name(m) for m in re.findall(r"(?<![:\w])(?:conveyor|grpc_server)_[a-z_]+\b", text)}
    exported = {_base_name(m) for m in stack.exported}
    missing = named - exported
    assert missing == set(), f"named in rules.yml or the dashboard, not on /metrics: {sorted(missing)}"


def test_dashboard_has_the_panels_of_the_design() -> None:
    titles = " | ".join(target.panel for target in dashboard_targets()).lower()
    for topic in ("latency", "throughput", "batch", "queue wait", "sessions", "errors by code"):
        assert topic in titles, f"no dashboard panel about {topic!r}"


@pytest.mark.parametrize("target", dashboard_targets(), ids=lambda t: f"{t.panel}: {t.legend}")
def test_panel_query_returns_data(stack: Stack, target: Target) -> None:
    expr = target.expr
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    deadline = time.monotonic() + DATA_TIMEOUT_S
    result = _query(stack.prometheus_url, expr)
    while not _finite(result) and time.monotonic() < deadline:
        time.sleep(1)
        result = _query(stack.prometheus_url, expr)
    assert _finite(result), f"{target.panel} / {target.legend}: {expr!r} returned no finite sample: {result}"


def test_rules_evaluate_and_stay_quiet_on_a_healthy_server(stack: Stack) -> None:
    # Let the rules see traffic first: the quantile rules exist once the latency histogram has two samples.
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while (
        not _query(stack.prometheus_url, "conveyor:chunk_latency_seconds:p99_1m")
        and time.monotonic() < deadline
    ):
        time.sleep(1)
    groups = _get_json(f"{stack.prometheus_url}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules if rule["type"] == "alerting"} >= {
        "ConveyorTargetDown",
        "ConveyorChunkLatencyP99High",
        "ConveyorHighErrorRatio",
        "ConveyorSessionsNearCapacity",
    }
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    firing = [rule["name"] for rule in rules if rule["type"] == "alerting" and rule["state"] == "firing"]
    assert firing == []
