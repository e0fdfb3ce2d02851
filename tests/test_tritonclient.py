"""Triton's own client, tritonclient.grpc 2.51, against a real server's Open Inference Protocol: sequences
over `infer` with int and string ids, 64 sequences interleaved on one `async_stream_infer` stream, each equal
to its whole-sequence ONNX Runtime run; the bad requests each with its code; the stream's sequences across
kill -9 of the replica holding them (Redis, nginx).

tritonclient cannot live in .venv (it needs numpy<2 and protobuf<5), so it runs in .venv-triton (`make
triton-client`, which `make test` runs) through scripts/triton_driver.py, and these tests read its JSON.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from local_services import ServerProcess, replicas_behind_nginx
from serving_harness import assert_close, make_inputs, offline, running

from serving.client.core import ROUTE_HEADER

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
DRIVER = ROOT / "scripts" / "triton_driver.py"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not TRITON_PYTHON.exists(), reason="no .venv-triton: run `make triton-client`"),
]
MODEL = "language"


@pytest.fixture(scope="module")
def target(token_artifact: Path) -> Iterator[str]:
    with running(token_artifact, max_batch_size=64) as server:
        yield f"127.0.0.1:{server.port}"


def driver_command(scenario: str, target: str, work: Path, *flags: str) -> list[str]:
    return [str(TRITON_PYTHON), str(DRIVER), scenario, "--target", target, "--model", MODEL,
            "--input", str(work / "in.json"), "--out", str(work / "out.json"), *flags]  # fmt: skip


def drive(scenario: str, target: str, items: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    """Run the driver's `scenario` on `items` and return what it wrote."""
    (work / "in.json").write_text(json.dumps(items))
    done = subprocess.run(driver_command(scenario, target, work), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    return result


def random_sequences(
    artifact: Path, ids: list[int | str], rng: np.random.Generator, longest: int = 30
) -> dict[int | str, np.ndarray]:
    return {key: make_inputs(artifact, int(rng.integers(2, longest + 1)), rng) for key in ids}


def as_items(sequences: dict[int | str, np.ndarray], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The driver's input: each sequence in 1 to 4 chunks of random sizes."""
    items = []
    for key, x in sequences.items():
        inner = sorted(rng.choice(np.arange(1, len(x)), size=min(3, len(x) - 1), replace=False))
        sizes = [int(b - a) for a, b in itertools.pairwise([0, *inner, len(x)])]
        items.append({"id": key, "inputs": x.tolist(), "chunks": sizes, "dtype": "INT64"})
    return items


def assert_whole_runs(result: dict[str, Any], sequences: dict[int | str, np.ndarray], artifact: Path) -> None:
    """Every sequence answered in full, its chunks' outputs joined equal to its one whole run."""
    assert result["errors"] == []
    for key, x in sequences.items():
        chunks = result["sequences"][json.dumps(key)]
        assert None not in chunks, f"sequence {key!r}: a chunk got no answer"
        assert_close(np.concatenate([np.asarray(c, np.float32) for c in chunks]), offline(artifact, x))


def test_infer_with_int_and_string_sequence_ids(target: str, token_artifact: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    sequences = random_sequences(token_artifact, [5, "5", 2**40, "call-7"], rng)
    items = as_items(sequences, rng)
    result = drive("unary", target, items, tmp_path)
    assert_whole_runs(result, sequences, token_artifact)
    # int 5 and string "5" are two sequences: were they one, the second would have failed its start or mixed
    sent = [f"{i}/{k}" for i, item in enumerate(items) for k in range(len(item["chunks"]))]
    assert result["ids"] == sent  # each response echoes its request's id


def test_64_sequences_interleaved_on_one_stream(target: str, token_artifact: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    ids: list[int | str] = [*range(1, 33), *(f"stream-{i}" for i in range(32))]
    sequences = random_sequences(token_artifact, ids, rng, longest=60)
    result = drive("stream", target, as_items(sequences, rng), tmp_path)
    assert_whole_runs(result, sequences, token_artifact)
    assert len(result["ids"]) == len(set(result["ids"])) == sum(map(len, result["sequences"].values()))


def bad(name: str, **fields: Any) -> dict[str, Any]:
    """One errors-scenario case: token ids [[1, 2, 3]] unless `fields` say otherwise."""
    return {"name": name, "inputs": [[1, 2, 3]], "dtype": "INT64", "sequence_id": name} | fields


ERROR_CASES: list[tuple[dict[str, Any], str | None, str]] = [
    (bad("unknown-id", start=False), "INVALID_ARGUMENT", "must specify the sequence_start flag"),
    (bad("one-request", end=True), None, "the call succeeded"),
    (bad("one-request", start=False), "INVALID_ARGUMENT", "must specify the sequence_start flag"),
    (bad("dtype", inputs=[[1.0, 2.0]], dtype="FP32"), "INVALID_ARGUMENT", "is FP32: the model takes INT64"),
    (bad("batch-2", inputs=[[1, 2, 3], [4, 5, 6]]), "INVALID_ARGUMENT", "the model takes [1, -1]"),
    (bad("declared-shape", shape=[1, 4]), "INVALID_ARGUMENT", "holds 3 values for shape [1, 4]"),
    (bad("input-name", input_name="tokens"), "INVALID_ARGUMENT", "the model takes one, 'x'"),
    (bad("output-name", outputs=["probabilities"]), "INVALID_ARGUMENT", "unknown output 'probabilities'"),
    (bad("vocabulary", inputs=[[10**6]]), "INVALID_ARGUMENT", "outside the vocabulary"),
    (bad("unknown-model", model="other"), "NOT_FOUND", "model 'other' is not served here"),
    (bad("unknown-version", version="7"), "NOT_FOUND", "version '7' is not served"),
]


def test_bad_requests_get_their_code_through_tritonclient(target: str, tmp_path: Path) -> None:
    """In order: a one-request sequence succeeds, and the same id without start is then refused, as an id
    never started is."""
    result = drive("errors", target, [case for case, _, _ in ERROR_CASES], tmp_path)
    assert [e["name"] for e in result["errors"]] == [case["name"] for case, _, _ in ERROR_CASES]
    for error, (_, code, message) in zip(result["errors"], ERROR_CASES, strict=True):
        assert error["status"] == (code and f"StatusCode.{code}"), error
        assert message in error["message"], error


def test_a_stream_of_64_sequences_outlives_kill_9_of_its_replica(
    token_artifact: Path, tmp_path: Path
) -> None:
    """Two replicas on one durable Redis behind nginx; tritonclient's stream, routed by its header, carries 64
    sequences; after two rounds the replica holding the stream is killed. The driver starts a new stream,
    which nginx sends to the other replica, and goes on with the same sequence_offsets: every sequence still
    equals its whole run."""
    rng = np.random.default_rng(13)
    ids: list[int | str] = [f"call-{i}" for i in range(64)]
    sequences = random_sequences(token_artifact, ids, rng, longest=40)
    (tmp_path / "in.json").write_text(json.dumps(as_items(sequences, rng)))
    with replicas_behind_nginx(token_artifact, tmp_path, fail_timeout_s=1) as (one, two, proxy_port):
        header = f"{ROUTE_HEADER}: triton-stream"
        flags = ("--pause-after", "2", "--header", header)
        command = driver_command("failover", f"127.0.0.1:{proxy_port}", tmp_path, *flags)
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as driver:
            assert driver.stdout is not None and driver.stdin is not None
            assert driver.stdout.readline().strip() == "paused"
            holder = max((one, two), key=ServerProcess.chunks_answered)
            assert one.chunks_answered() * two.chunks_answered() == 0  # the stream went to one replica
            holder.kill()
            driver.stdin.write("go\n")
            driver.stdin.flush()
            assert driver.wait(150) == 0
        survivor = two if holder is one else one
        assert survivor.chunks_answered() > 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["restarts"] >= 1
    assert_whole_runs(result, sequences, token_artifact)
