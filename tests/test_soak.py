"""`conveyor soak`, short: a real server process, real gRPC, every kind of traffic, every answer judged.

No memory assertion on a run of seconds (the allocator is still settling); that a run samples memory, and
how it judges a drift, is checked here; whether memory stays flat is for the 10-minute soak to report.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from serving.bench.grid import BenchError
from serving.bench.soak.cases import AFTER_END, CASES
from serving.bench.soak.options import SoakOptions
from serving.bench.soak.run import SoakResult
from serving.bench.soak.tally import Memory, Tally
from serving.cli.main import main
from serving.client import ModelInfo
from serving.wire import pb

pytestmark = pytest.mark.timeout(90)

TRAFFIC = ("opened", "opened, id issued", "via Stream", "via Frames", "via Step", "idle", "reconnect",
           "retry", "end flag", "EndSession", "expiry", "bad", "timesteps")  # fmt: skip
CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ABORTED", "ALREADY_EXISTS"}


def test_a_short_soak_drives_every_kind_of_traffic_and_gets_only_the_codes_due(
    token_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "soak"
    flags = ["--minutes", "0.15", "--sessions", "16", "--connections", "4", "--think-ms", "50"]
    flags += ["--idle-ttl-s", "1.5", "--sample-s", "0.5", "--out", str(out)]
    status = main(["soak", "--model", str(token_artifact), *flags])
    report = json.loads((out / "soak.json").read_text())

    assert report["unexpected"] == 0, report["failures"]
    assert status == 0 and report["passed"]
    assert [kind for kind in TRAFFIC if report["traffic"].get(kind, 0) == 0] == [], (
        "traffic that never happened"
    )
    by_kind = report["answers_by_kind"]
    assert by_kind["after expiry"] == {"NOT_FOUND": by_kind["after expiry"]["NOT_FOUND"]}
    assert report["checks"]["replay"]["passed"] > 0 and report["checks"]["outputs"]["passed"] > 0
    assert report["max_scaled_difference"] <= 1e-5

    # Every bad request, each kind sent, got exactly the code the contract gives it, and nothing else.
    assert set(report["bad_requests"]) == {case.name for case in (*CASES, AFTER_END)}
    for case, sent in report["bad_requests"].items():
        assert set(sent["answers"]) == {sent["due"]}, case
    codes = report["answers_by_code"]
    assert set(codes) == CODES and all(counts["unexpected"] == 0 for counts in codes.values())
    assert set(report["answers_by_kind"]["chunk"]) == {"OK"}

    memory = report["memory"]
    times = [t for t, _ in memory["samples"]]
    assert len(times) >= 10 and times == sorted(times) and times[0] == 0.0
    assert all(rss > 0 for _, rss in memory["samples"])
    assert memory["drift_pct"] == pytest.approx(
        100 * (memory["max_after_warmup_bytes"] - memory["at_warmup_bytes"]) / memory["at_warmup_bytes"]
    )
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "soak.txt").read_text()
    assert text.startswith("soak: ") and "PASSED: 0 unexpected" in text


def test_memory_is_judged_from_the_warm_up_on() -> None:
    memory = Memory(((0.0, 50), (1.0, 100), (2.0, 104), (3.0, 112), (4.0, 108)), warmup_s=1.0)
    assert (memory.at_start, memory.at_warmup, memory.max_after, memory.last) == (50, 100, 112, 108)
    assert memory.drift_pct == pytest.approx(12.0)
    assert memory.slope_mb_per_min == pytest.approx(60 * 3.2e-6)  # the fitted line: 3.2 bytes a second


def test_an_unexpected_answer_or_a_drift_fails_the_soak(tmp_path: Path) -> None:
    options = SoakOptions(model_dir=tmp_path, duration_s=10, sample_s=1, max_drift_pct=10)
    info = ModelInfo.from_proto(pb.ModelInfo(name="m", input_kind="tokens", idle_ttl_s=3.0))
    flat = Memory(((0.0, 100), (2.0, 100), (9.0, 105)), options.warmup)
    tally = Tally(lambda: 1.0, bucket_s=1)
    assert SoakResult(options, info, 10, tally, flat).passed
    tally.answer("chunk", grpc.StatusCode.INTERNAL.name, "OK", "internal server error")
    assert not SoakResult(options, info, 10, tally, flat).passed
    grown = Memory(((0.0, 100), (2.0, 100), (9.0, 111)), options.warmup)
    verdict = SoakResult(options, info, 10, Tally(lambda: 1.0, bucket_s=1), grown).verdict()
    assert verdict.startswith("FAILED: 0 unexpected") and "+11.0%" in verdict and "over 10%" in verdict


def test_options_refuse_what_cannot_run(tmp_path: Path) -> None:
    for bad in (
        {},
        {"model_dir": tmp_path, "target": "127.0.0.1:1"},
        {"target": "127.0.0.1:1"},  # no /metrics to read its memory from
        {"model_dir": tmp_path, "sessions": 0},
        {"model_dir": tmp_path, "duration_s": 10, "warmup_s": 10},
    ):
        with pytest.raises(BenchError):
            SoakOptions(**bad)
    assert (
        SoakOptions(model_dir=tmp_path).warmup == 60
        and SoakOptions(model_dir=tmp_path, duration_s=60).warmup == 12
    )
