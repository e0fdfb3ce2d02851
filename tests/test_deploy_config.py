"""The deployment's configuration: Prometheus config and rules (promtool), compose files, Grafana
provisioning, and the server refusing, readably, to start on an empty or corrupt model directory (as the
compose stack's server would on a bad `artifacts` volume).

promtool comes with Debian's prometheus package (`apt-get install -y prometheus`); compose validation runs
where `docker compose` or `docker-compose` is installed (no engine needed). Without them, those tests skip and
say why.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.offline.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)"
)


def _run(*command: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and _run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    assert PROMTOOL is not None
    result = _run(PROMTOOL, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_and_recording_rules_pass_their_unit_tests() -> None:
    assert PROMTOOL is not None
    result = _run(PROMTOOL, "test", "rules", str(PROMETHEUS_DIR / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", (PROMETHEUS_DIR / "rules.yml").read_text(), re.MULTILINE))
    tests = (PROMETHEUS_DIR / "rules_test.yml").read_text()
    assert alerts >= {
        "ConveyorTargetDown",
        "ConveyorChunkLatencyP99High",
        "ConveyorHighErrorRatio",
        "ConveyorSessionsNearCapacity",
        "ConveyorSessionStoreUnreachable",
        "ConveyorDrainPastDeadline",
    }
    for alert in alerts:
        # A case that fires (exp_alerts with labels) and one that does not (exp_alerts: []).
        cases = re.findall(rf"alertname: {alert}\n\s+eval_time: \S+\n\s+exp_alerts:(.*)", tests)
        assert any(case.strip() == "[]" for case in cases), f"{alert} has no test where it stays quiet"
        assert any(case.strip() == "" for case in cases), f"{alert} has no test where it fires"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_images_are_pinned_and_ports_bound_to_loopback(path: Path) -> None:
    # ${VAR:-default} -> default: what the file gives when the variable is not set.
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", path.read_text())
    for image in re.findall(r"^\s*image:\s*(\S+)", text, re.MULTILINE):
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and not image.endswith("}"), (
            f"{path.name}: image {image} is not pinned"
        )
    for port in re.findall(r"^\s*-\s*\"?([\d.:]+)\"?\s*$", text, re.MULTILINE):
        if port.count(":") >= 1:
            assert port.startswith("127.0.0.1:"), f"{path.name}: port {port} is published beyond loopback"


def test_plain_compose_file_validates() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose is installed (apt-get install -y docker-compose)"
        )
    result = _run(*compose, "-f", str(COMPOSE_FILES[0]), "config", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    merged = _run(*compose, "-f", str(COMPOSE_FILES[0]), "-f", str(COMPOSE_FILES[1]), "config")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "PIP_OFFLINE" in merged.stdout and "conveyor-prometheus:" in merged.stdout
    scale = _run(*compose, "-f", str(COMPOSE_FILES[0]), "--profile", "scale", "config")
    assert scale.returncode == 0, scale.stdout + scale.stderr
    services = yaml.safe_load(scale.stdout)["services"]
    replicas = [services[name]["environment"] for name in ("server-1", "server-2")]
    assert {env["CONVEYOR_STORE"] for env in replicas} == {"redis://redis:6379/0"}
    assert any("deploy/nginx/nginx.conf" in str(volume) for volume in services["nginx"]["volumes"])


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s*uid:\s*(\S+)", datasource, re.MULTILINE)
    assert uid is not None
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "conveyor.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == uid.group(1), f"panel {panel['title']!r}: wrong datasource"


def _serve(model_dir: Path) -> subprocess.CompletedProcess[str]:
    # `python -m serving.cli` is the `conveyor` console script, without depending on where it was installed.
    return _run(
        sys.executable, "-m", "serving.cli", "serve", "--model", str(model_dir), "--port", "0",
        "--metrics-port", "0", timeout_s=120,
    )  # fmt: skip


def _assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert "conveyor serve: error:" in result.stderr, output
    for phrase in phrases:
        assert phrase in result.stderr, output


def test_server_refuses_an_empty_model_directory(tmp_path: Path) -> None:
    _assert_refused(_serve(tmp_path), "model.onnx")


def test_server_refuses_a_missing_model_directory(tmp_path: Path) -> None:
    _assert_refused(_serve(tmp_path / "language"))


def test_server_refuses_a_corrupt_model(token_artifact: Path, tmp_path: Path) -> None:
    shutil.copy(token_artifact / "model.json", tmp_path / "model.json")
    (tmp_path / "model.onnx").write_bytes(b"this is not an ONNX graph")
    _assert_refused(_serve(tmp_path), "model.onnx")


def test_server_refuses_a_model_that_does_not_load(token_artifact: Path, tmp_path: Path) -> None:
    # A card that matches the bytes (so the fingerprint check passes) but bytes that ONNX Runtime cannot load:
    # the case of a truncated copy whose card was regenerated.
    onnx = (token_artifact / "model.onnx").read_bytes()[:200]
    card = json.loads((token_artifact / "model.json").read_text())
    card["onnx_sha256"] = hashlib.sha256(onnx).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(card))
    (tmp_path / "model.onnx").write_bytes(onnx)
    _assert_refused(_serve(tmp_path), "corrupt model")
