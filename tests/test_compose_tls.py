"""The TLS compose variant, without docker: scripts/make_tls_certs.sh makes its certificates, and a real
`conveyor serve` process configured by docker-compose.tls.yml's own environment (its /tls/ paths pointed at
the script's directory) serves them: the chain validates for every name in the certificate and for no
other, the story streams exactly over TLS and mutual TLS, plaintext and strangers are kept out, and the
compose file's health check passes. The file itself: it parses, sets only variables the server reads, hands
the server only files the script makes, and merges with the other compose files (where docker-compose is
installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from local_services import free_port
from serving_harness import assert_close, offline, sequence

from serving.cli.main import main
from serving.client import ClientOptions, ConveyorClient, ConveyorError, RetryPolicy, Tls
from serving.server.config import ENV_PREFIX, ServerConfig

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates"),
]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_tls_certs.sh"
TLS_FILE = ROOT / "docker-compose.tls.yml"
# What the script's server certificate must cover: what clients dial, on the host and on the compose network.
NAMES = ("localhost", "127.0.0.1", "server", "server-1", "server-2", "nginx")
MADE = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
ONCE = RetryPolicy(max_attempts=1)
MOUNT = "/tls/"  # where the server finds its files in the compose variant


def _make_certs(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(directory), *names], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The script's output for a fresh directory."""
    directory = tmp_path_factory.mktemp("compose") / "tls"
    result = _make_certs(directory)
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another run of the script: a CA (and certificates) the server knows nothing of."""
    directory = tmp_path_factory.mktemp("stranger") / "tls"
    assert _make_certs(directory).returncode == 0
    return directory


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(TLS_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's ${NAME:-default}, for the host variables in `variables`."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: variables.get(m[1]) or m[2], value)


def _server_env(certs: Path, variables: Mapping[str, str]) -> dict[str, str]:
    """The compose server's TLS environment, with its /tls/ files taken from `certs`."""
    environment = _compose()["services"]["server"]["environment"]
    env = {name: _interpolate(str(value), variables) for name, value in environment.items()}
    return {name: value.replace(MOUNT, f"{certs}/") for name, value in env.items()}


class TlsServer:
    """`conveyor serve` in a process of its own, with the compose variant's TLS environment."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, env: dict[str, str]) -> None:
        self.process, self.port, self.env = process, port, env


@contextmanager
def _tls_server(artifact: Path, certs: Path, tmp: Path, variables: Mapping[str, str]) -> Iterator[TlsServer]:
    env = _server_env(certs, variables)
    port = free_port()
    log = tmp / "server.log"
    command = [sys.executable, "-m", "serving.cli", "serve", "--model", str(artifact), "--port", str(port),
               "--metrics-port", str(free_port())]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=output, stderr=output)
    server = TlsServer(process, port, env)
    try:
        mutual = bool(env["CONVEYOR_TLS_CLIENT_CA"])
        tls = (
            Tls(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key") if mutual else None
        )
        options = ClientOptions(tls=tls or Tls(ca=certs / "ca.pem"), retry=ONCE, timeout_s=5)
        with ConveyorClient(f"127.0.0.1:{port}", options) as client:
            try:
                client.wait_for_ready(timeout_s=60)
            except ConveyorError:
                process.kill()
                process.wait(10)
                pytest.fail(f"the TLS server did not become SERVING:\n{log.read_text()}")
        yield server
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def tls_server(
    token_artifact: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsServer]:
    with _tls_server(token_artifact, certs, tmp_path_factory.mktemp("tls-server"), {}) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(
    token_artifact: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsServer]:
    # Mutual TLS as the compose file's comment says to ask for it.
    variables = {"CONVEYOR_TLS_CLIENT_CA": "/tls/ca.pem"}
    with _tls_server(token_artifact, certs, tmp_path_factory.mktemp("mtls-server"), variables) as server:
        yield server


def _health(port: int, ca: Path, name: str | None) -> int:
    """grpc.health.v1 over TLS trusting `ca`, checking the certificate for `name` (None: the target's IP)."""
    options = [] if name is None else [("grpc.ssl_target_name_override", name)]
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def _stream(target: str, tls: Tls, artifact: Path) -> None:
    """A sequence in two chunks over one session: exactly the offline outputs."""
    x = sequence(artifact, 10)
    with (
        ConveyorClient(target, ClientOptions(tls=tls, retry=ONCE, timeout_s=5)) as client,
        client.session() as session,
    ):
        streamed = [session.send(x[:4]), session.send(x[4:])]
    expected = offline(artifact, x)
    assert_close(streamed[0], expected[:4])
    assert_close(streamed[1], expected[4:])


def _refused(port: int, tls: Tls | None) -> None:
    options = ClientOptions(tls=tls, retry=ONCE, timeout_s=5)
    with ConveyorClient(f"127.0.0.1:{port}", options) as client, pytest.raises(ConveyorError) as refused:
        client.model_info()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value


def test_script_writes_a_ca_a_server_and_a_client_certificate_with_private_keys_0600(certs: Path) -> None:
    for name in MADE:
        mode = (certs / name).stat().st_mode & 0o777
        assert mode == (0o600 if name.endswith(".key") else 0o644), f"{name}: mode {mode:o}"
    assert (certs / ".gitignore").read_text() == "*\n"
    assert sorted(path.name for path in certs.iterdir()) == sorted([*MADE, ".gitignore"])
    san = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    for name in NAMES:
        assert (f"IP Address:{name}" if name[0].isdigit() else f"DNS:{name}") in san, san


def test_script_keeps_a_complete_set_and_refuses_a_partial_one_or_other_names(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = _make_certs(directory, "conveyor.example", "10.1.2.3")
    assert first.returncode == 0, first.stderr
    for name in MADE:
        assert name in first.stdout
    assert "docker-compose.tls.yml" in first.stdout and "--ca" in first.stdout
    written = {name: (directory / name).read_bytes() for name in MADE}

    again = _make_certs(directory, "conveyor.example", "10.1.2.3")
    assert again.returncode == 0, again.stderr
    assert "nothing written" in again.stdout
    assert {name: (directory / name).read_bytes() for name in MADE} == written

    other = _make_certs(directory, "elsewhere.example")
    assert other.returncode == 1
    assert "not valid for 'elsewhere.example'" in other.stderr

    (directory / "client.key").unlink()
    partial = _make_certs(directory)
    assert partial.returncode == 1
    assert "refusing" in partial.stderr and "client.key" in partial.stderr
    assert {name: (directory / name).read_bytes() for name in MADE if name != "client.key"} == {
        name: data for name, data in written.items() if name != "client.key"
    }


def test_tls_chain_validates_for_every_name_in_the_certificate_and_no_other(
    tls_server: TlsServer, certs: Path
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in NAMES:
        # 127.0.0.1 is dialled as itself (an IP address in the certificate), every other name by override.
        assert _health(tls_server.port, certs / "ca.pem", None if name == "127.0.0.1" else name) == serving
    with pytest.raises(grpc.RpcError) as refused:
        _health(tls_server.port, certs / "ca.pem", "elsewhere.example")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_server_streams_exactly_to_a_client_trusting_the_scripts_ca(
    tls_server: TlsServer, certs: Path, token_artifact: Path
) -> None:
    for host in ("127.0.0.1", "localhost"):
        _stream(f"{host}:{tls_server.port}", Tls(ca=certs / "ca.pem"), token_artifact)


def test_tls_server_keeps_out_plaintext_and_clients_trusting_another_ca(
    tls_server: TlsServer, stranger_ca: Path
) -> None:
    _refused(tls_server.port, None)
    _refused(tls_server.port, Tls(ca=stranger_ca / "ca.pem"))


def test_mutual_tls_lets_in_the_scripts_client_certificate_alone(
    mtls_server: TlsServer, certs: Path, stranger_ca: Path, token_artifact: Path, tmp_path: Path
) -> None:
    client = Tls(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
    _stream(f"localhost:{mtls_server.port}", client, token_artifact)
    _refused(mtls_server.port, None)
    _refused(mtls_server.port, Tls(ca=certs / "ca.pem"))
    _refused(
        mtls_server.port,
        Tls(ca=certs / "ca.pem", cert=stranger_ca / "client.pem", key=stranger_ca / "client.key"),
    )
    # `conveyor stream` as the script's usage prints it.
    story = tmp_path / "story.txt"
    story.write_text("i grew up in france . i speak fluent")
    tls = [
        "--ca",
        str(certs / "ca.pem"),
        "--cert",
        str(certs / "client.pem"),
        "--key",
        str(certs / "client.key"),
    ]
    assert main(["stream", "--target", f"127.0.0.1:{mtls_server.port}", *tls, str(story)]) == 0


def _health_check_code() -> str:
    test = _compose()["services"]["server"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return str(test[3])


def _run_health_check(server: TlsServer, certs: Path, **changes: str) -> subprocess.CompletedProcess[str]:
    # The container's environment: the image sets CONVEYOR_PORT, compose the TLS variables.
    env = {**os.environ, **server.env, "CONVEYOR_PORT": str(server.port), **changes}
    code = _health_check_code().replace(MOUNT, f"{certs}/")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_compose_health_check_passes_over_tls_and_mutual_tls(
    tls_server: TlsServer, mtls_server: TlsServer, certs: Path
) -> None:
    for server in (tls_server, mtls_server):
        result = _run_health_check(server, certs)
        assert result.returncode == 0, result.stdout + result.stderr
    # Under mutual TLS it passes because it presents the server's certificate: without it, it fails.
    assert _run_health_check(mtls_server, certs, CONVEYOR_TLS_CLIENT_CA="").returncode != 0


def test_tls_override_sets_only_variables_the_server_reads_and_files_the_script_makes(certs: Path) -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"tls-init", "server"}, (
        "the scale profile's services are documented as not covered"
    )
    assert 'Not covered: the profile "scale"' in TLS_FILE.read_text()
    server, init = services["server"], services["tls-init"]

    read = {ENV_PREFIX + field.name.upper() for field in fields(ServerConfig)}
    assert set(server["environment"]) <= read
    assert {"CONVEYOR_TLS_CERT", "CONVEYOR_TLS_KEY", "CONVEYOR_TLS_CLIENT_CA"} <= set(server["environment"])

    # The server reads /tls/ from the volume tls, read-only; tls-init fills it from the script's directory.
    assert "tls:/tls:ro" in server["volumes"] and "tls" in compose["volumes"]
    assert "tls:/tls" in init["volumes"]
    source = next(volume for volume in init["volumes"] if volume.endswith(":/source:ro"))
    assert source.startswith("${CONVEYOR_TLS_DIR:-./tls}:")
    assert 'dir="${1:-$root/tls}"' in SCRIPT.read_text(), "the script's default directory is compose's"
    copied = set(re.findall(r"/source/([\w.]+)", init["entrypoint"][-1]))
    assert copied == {"ca.pem", "server.pem", "server.key"}, "ca.key and client.key stay out of containers"
    assert copied <= {path.name for path in certs.iterdir()}
    assert init["image"] == server.get("image", "conveyor-server:0.1.0")  # the image with the user `conveyor`
    assert re.search(r"install -m 0400 -o conveyor -g conveyor /source/server\.key", init["entrypoint"][-1])

    # Every /tls/ path the server is given (the mutual TLS value in the comment included) is copied.
    mutual = _server_env(Path("/tls"), {"CONVEYOR_TLS_CLIENT_CA": "/tls/ca.pem"})
    paths = [value for value in mutual.values() if value.startswith(MOUNT)]
    paths += re.findall(r"/tls/[\w.]+", _health_check_code())
    assert paths and {Path(path).name for path in paths} <= copied, paths


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_tls_override_merges_with_the_compose_files() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose is installed (apt-get install -y docker-compose)"
        )
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.offline.yml", "-f", TLS_FILE.name]

    def merged(*args: str) -> dict[str, Any]:
        result = subprocess.run(
            [*compose, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        loaded = yaml.safe_load(result.stdout)
        assert isinstance(loaded, dict)
        return loaded

    for chosen in (files[:2] + files[4:], files):
        server = merged(*chosen)["services"]["server"]
        assert set(server["depends_on"]) == {"trainer", "tls-init"}
        assert server["environment"]["CONVEYOR_MODEL_DIR"] == "/artifacts/language"
        assert server["environment"]["CONVEYOR_TLS_CERT"] == "/tls/server.pem"
        assert server["healthcheck"]["interval"] == "5s" and "ssl_channel_credentials" in str(
            server["healthcheck"]["test"]
        )
        assert any(str(volume).startswith("artifacts:/artifacts") for volume in server["volumes"])
    scale = merged(*files, "--profile", "scale")["services"]
    assert all("CONVEYOR_TLS_CERT" not in scale[name]["environment"] for name in ("server-1", "server-2"))
