"""Tenants over real channels: bearer tokens from a file of digests, UNAUTHENTICATED without a known one, each
tenant's sessions its own (one guessing another's id gets exactly what an unknown id gets), per-tenant quotas,
and tokens that never reach the logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import assert_close, health_status, offline, running, sequence

from serving.cli.main import main
from serving.client import AsyncConveyorClient, ClientOptions, ConveyorClient, ConveyorError, RetryPolicy
from serving.server.app import RunningServer
from serving.server.auth import Tenants, new_token
from serving.server.config import ConfigError

pytestmark = pytest.mark.timeout(120)

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tenant -> its token; the file holds only digests (b has a quota of 2 sessions)."""
    made = {"a": new_token("a"), "b": new_token("b", 2)}
    path = tmp_path_factory.mktemp("tenants") / "tokens"
    path.write_text("# tenants of the test server\n" + "".join(f"{line}\n" for _, line in made.values()))
    return {tenant: token for tenant, (token, _) in made.items()} | {"file": str(path)}


@pytest.fixture(scope="module")
def server(token_artifact: Path, tokens: dict[str, str]) -> Iterator[RunningServer]:
    with running(token_artifact, tokens_file=tokens["file"]) as running_server:
        yield running_server


def _client(server: RunningServer, token: str | None) -> ConveyorClient:
    return ConveyorClient(f"127.0.0.1:{server.port}", ClientOptions(token=token, retry=ONCE, timeout_s=5))


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ConveyorError) as failed:
        call()  # type: ignore[operator]
    return failed.value.code, failed.value.message


def test_no_token_or_an_unknown_one_is_unauthenticated(server: RunningServer) -> None:
    x = np.array([1, 2], np.int64)
    for token in (None, "not-a-token"):
        with _client(server, token) as client:
            code, message = _code(lambda c=client: c.session().send(x))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in message
            assert _code(client.model_info)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(server) == 1  # the health service stays open to probes: SERVING


def test_a_tenant_cannot_touch_anothers_session(
    server: RunningServer, tokens: dict[str, str], token_artifact: Path
) -> None:
    x = sequence(token_artifact, 8)
    with _client(server, tokens["a"]) as a, _client(server, tokens["b"]) as b:
        a_session = a.session("private")
        first = a_session.send(x[:4])
        # b, guessing a's id, gets what an id that exists nowhere gets, word for word.
        guessed = _code(lambda: b.attach("private", 4).send(x[4:]))
        unknown = _code(lambda: b.attach("nowhere", 4).send(x[4:]))
        assert guessed[0] == unknown[0] == grpc.StatusCode.NOT_FOUND
        assert guessed[1] == unknown[1].replace("nowhere", "private")
        for session_id in ("private", "nowhere"):
            assert _code(lambda s=session_id: b.snapshot(s))[0] == grpc.StatusCode.NOT_FOUND
            assert _code(lambda s=session_id: b.end_session(s))[0] == grpc.StatusCode.NOT_FOUND
        # b's own session of the same name is b's: starting it is no ALREADY_EXISTS, and it is separate.
        with b.session("private") as b_session:
            assert_close(b_session.send(x[:2]), offline(token_artifact, x)[:2])
        rest = a_session.send(x[4:])  # a's session went on untouched
    assert_close(np.concatenate([first, rest]), offline(token_artifact, x))


def test_a_tenants_stream_hears_of_its_sessions_ending_by_their_own_ids(
    server: RunningServer, tokens: dict[str, str]
) -> None:
    async def scenario() -> str | None:
        options = ClientOptions(token=tokens["a"], retry=ONCE, timeout_s=5)
        async with AsyncConveyorClient(f"127.0.0.1:{server.port}", options) as client:
            session = client.session("heard")
            await session.send(np.array([1, 2], np.int64))
            with _client(server, tokens["a"]) as other_connection:
                other_connection.end_session("heard")
            for _ in range(200):  # the notice arrives in band, soon after
                if session.end_reason is not None:
                    break
                await asyncio.sleep(0.01)
            return session.end_reason

    assert asyncio.run(scenario()) == "end"


def test_a_tenant_quota_is_resource_exhausted_naming_it(
    server: RunningServer, tokens: dict[str, str], token_artifact: Path
) -> None:
    x = sequence(token_artifact, 2)
    with _client(server, tokens["b"]) as b, _client(server, tokens["a"]) as a:
        held = [b.session(f"quota-{i}") for i in range(2)]
        for session in held:
            session.send(x)
        code, message = _code(lambda: b.session("quota-2").send(x))
        assert (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "tenant 'b' is at its quota of 2 sessions" in message
        )
        a.session("a-is-not-limited").send(x)  # another tenant's quota is its own
        held[0].end()
        b.session("quota-2").send(x)  # room again once one has ended


def test_tokens_never_reach_the_log(
    token_artifact: Path, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), running(token_artifact, tokens_file=tokens["file"]) as quiet:
        with _client(quiet, tokens["a"]) as client:
            client.session().send(np.array([1, 2], np.int64))
        with _client(quiet, "wrong-" + tokens["b"]) as client:
            _code(client.model_info)
    assert tokens["a"] not in caplog.text and tokens["b"] not in caplog.text


def test_token_files_are_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{new_token('ok')[1]}\nnot a digest line\n")
    with pytest.raises(ConfigError, match=r"line 2 is not '<sha256 hex> <tenant> \[<max sessions>\]'"):
        Tenants.load(str(path))
    path.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="names no tenant"):
        Tenants.load(str(path))
    with pytest.raises(ConfigError, match="tenant names are"):
        new_token("has space")


def test_conveyor_token_prints_a_token_and_the_line_that_admits_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["token", "--tenant", "acme", "--max-sessions", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    token, line = out[0].rpartition(" ")[2], out[1].rpartition(": ")[2]
    assert line.endswith(" acme 5") and token not in line
    (tmp_path / "tokens").write_text(line + "\n")
    tenant = Tenants.load(str(tmp_path / "tokens")).identify([("authorization", f"Bearer {token}")])
    assert (tenant.name, tenant.max_sessions) == ("acme", 5)
