"""TLS and mutual TLS on the gRPC port, over real channels, with certificates made at test time (openssl): the
right client gets in and its outputs are exact; a plaintext client, a client trusting another CA, and (with
mutual TLS) a client without a certificate or with one another CA signed are all kept out."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serving_harness import assert_close, offline, running, sequence

from serving.cli.main import main
from serving.client import ClientOptions, ConveyorClient, ConveyorError, RetryPolicy, Tls
from serving.server.app import RunningServer
from serving.server.config import ConfigError

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates"),
]

ONCE = RetryPolicy(max_attempts=1)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _authority(directory: Path, name: str) -> None:
    subject = f"/CN=Conveyor test {name}"
    _openssl("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
             "-subj", subject, cwd=directory)  # fmt: skip


def _signed(directory: Path, name: str, authority: str, extension: str) -> None:
    (directory / f"{name}.ext").write_text(extension + "\n")
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{authority}.pem", "-CAkey", f"{authority}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (signs the server and a client), other-ca (signs an intruder), their certificates and keys."""
    directory = tmp_path_factory.mktemp("pki")
    _authority(directory, "ca")
    _authority(directory, "other-ca")
    _signed(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    _signed(directory, "intruder", "other-ca", "extendedKeyUsage=clientAuth")
    return directory


def _tls_server(artifact: Path, pki: Path, *, mutual: bool) -> Iterator[RunningServer]:
    client_ca = str(pki / "ca.pem") if mutual else ""
    with running(
        artifact, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_client_ca=client_ca
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(token_artifact: Path, pki: Path) -> Iterator[RunningServer]:
    yield from _tls_server(token_artifact, pki, mutual=False)


@pytest.fixture(scope="module")
def mtls_server(token_artifact: Path, pki: Path) -> Iterator[RunningServer]:
    yield from _tls_server(token_artifact, pki, mutual=True)


def _stream(server: RunningServer, tls: Tls | None, artifact: Path) -> None:
    """Stream a sequence in two chunks and check it against the offline run."""
    x = sequence(artifact, 10)
    with ConveyorClient(
        f"127.0.0.1:{server.port}", ClientOptions(tls=tls, retry=ONCE, timeout_s=5)
    ) as client:
        client.wait_for_ready(timeout_s=10)
        with client.session() as session:
            streamed = [session.send(x[:4]), session.send(x[4:])]
    assert_close(streamed[0], offline(artifact, x)[:4])
    assert_close(streamed[1], offline(artifact, x)[4:])


def _refused(server: RunningServer, tls: Tls | None) -> ConveyorError:
    with (
        ConveyorClient(f"127.0.0.1:{server.port}", ClientOptions(tls=tls, retry=ONCE, timeout_s=5)) as client,
        pytest.raises(ConveyorError) as refused,
    ):
        client.model_info()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    return refused.value


def test_tls_lets_in_a_client_that_trusts_the_ca(
    tls_server: RunningServer, token_artifact: Path, pki: Path
) -> None:
    _stream(tls_server, Tls(ca=pki / "ca.pem"), token_artifact)


def test_tls_keeps_out_plaintext_and_clients_trusting_another_ca(
    tls_server: RunningServer, pki: Path
) -> None:
    _refused(tls_server, None)
    _refused(tls_server, Tls(ca=pki / "other-ca.pem"))


def test_mutual_tls_lets_in_a_client_with_a_certificate_the_ca_signed(
    mtls_server: RunningServer, token_artifact: Path, pki: Path
) -> None:
    _stream(
        mtls_server, Tls(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key"), token_artifact
    )


def test_mutual_tls_keeps_out_clients_without_a_certificate_or_with_another_cas(
    mtls_server: RunningServer, pki: Path
) -> None:
    _refused(mtls_server, Tls(ca=pki / "ca.pem"))
    _refused(mtls_server, Tls(ca=pki / "ca.pem", cert=pki / "intruder.pem", key=pki / "intruder.key"))


def test_conveyor_stream_takes_the_ca_and_a_client_certificate(
    mtls_server: RunningServer, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "story.txt"
    text.write_text("i grew up in france . i speak fluent")
    target = f"127.0.0.1:{mtls_server.port}"
    tls = ["--ca", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")]
    assert main(["stream", "--target", target, *tls, str(text)]) == 0
    assert "->" in capsys.readouterr().out
    assert main(["stream", "--target", target, "--ca", str(pki / "missing.pem"), str(text)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_unreadable_or_half_given_certificates_are_refused_at_start(token_artifact: Path, pki: Path) -> None:
    with (
        pytest.raises(ConfigError, match=r"tls_cert \(.*nope.pem\) cannot be read"),
        running(token_artifact, tls_cert=str(pki / "nope.pem"), tls_key=str(pki / "server.key")),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"tls_key .* must be set together with tls_cert"),
        running(token_artifact, tls_cert=str(pki / "server.pem")),
    ):
        pass
