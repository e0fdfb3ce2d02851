"""`conveyor bench` on a micro grid: every mode runs end to end and its rows are complete and sane.

No speed assertions: how fast is for the bench to report, not for a test on a shared machine to judge.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
from local_services import redis_server

from serving.bench.cli import add_arguments, options_from_args, versions_options_from_args
from serving.bench.grid import MODES, BenchError, BenchOptions, Row, plan
from serving.bench.memory import MemoryOptions, run_memory
from serving.bench.report import format_table, plot, write_json
from serving.bench.run import run_bench
from serving.bench.targets import check_targets
from serving.bench.versions import check_versions, plot_versions, run_versions, summary
from serving.bench.versions_grid import BOTH, COLUMNS, VersionsOptions

pytestmark = pytest.mark.timeout(180)

REQUIRED_KEYS = {"mode", "sessions", "chunk_steps", "history_steps", "timesteps_per_s", "p50_ms", "p99_ms"}


def _micro(model_dir: Path) -> BenchOptions:
    return BenchOptions(
        model_dir=model_dir,
        sessions=(2,),
        chunk_steps=(3,),
        histories=(5,),
        stateless_sessions=(1,),
        one_stream_sessions=(3,),
        frame_sessions=(3,),
        frames_in_flight=2,  # frames of 2 and 1 sessions taking turns
        channels=2,
        warmup_s=0.1,
        seconds=0.3,
    )


def test_every_mode_gives_complete_sane_rows(token_artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:  # the durable mode's store
        options = replace(_micro(token_artifact), store=redis.url)
        rows = run_bench(options)
    assert [(r.mode, r.sessions, r.chunk_steps, r.history_steps) for r in rows] == [
        (c.mode, c.sessions, c.chunk_steps, c.history_steps) for c in plan(options)
    ]
    assert {row.mode for row in rows} == set(MODES)
    for row in rows:
        assert row.chunks > 0 and row.seconds > 0
        assert row.timesteps_per_s > 0 and row.chunks_per_s > 0
        assert 0 < row.p50_ms <= row.p99_ms
        assert row.cpu_s_per_1k_steps is not None and row.cpu_s_per_1k_steps >= 0
        # Stateless rows credit one new step per call (chunk_steps 1); others their chunk (plus, rarely, a
        # history prefix answered after the warm-up).
        assert row.timesteps_per_s >= row.chunks_per_s * row.chunk_steps * 0.99
        if row.mode == "ort_floor":
            # every session's chunk in one batch: the frames' sessions (3) have a floor row too
            assert row.channels == 0 and row.load_cpu_s_per_1k_steps is None
            assert row.mean_batch == row.sessions and row.sessions in (2, 3)
        else:
            one_stream = row.mode == "one_stream"  # every session on one stream, 1-step chunks
            assert row.channels == (1 if row.mode in ("one_stream", "frames") else min(2, row.sessions))
            assert not one_stream or (row.sessions, row.chunk_steps) == (3, 1)
            assert row.mode != "frames" or (row.sessions, row.chunk_steps) == (3, 3)
            assert row.load_cpu_s_per_1k_steps is not None and row.load_cpu_s_per_1k_steps >= 0
        if row.mode in ("batched", "one_stream", "frames", "durable", "unbatched", "stateless"):
            assert row.mean_batch is not None and 1 <= row.mean_batch <= row.sessions
        if row.mode == "unbatched":
            assert row.mean_batch == 1

    write_json(rows, tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved) == len(rows)
    assert all(REQUIRED_KEYS | {"channels", "cpu_s_per_1k_steps"} <= set(row) for row in saved)
    table = format_table(rows).splitlines()
    assert len(table) == len(rows) + 1 and table[0].split()[:2] == ["mode", "sessions"]
    checks = check_targets(rows)
    assert checks and all(check.met is None for check in checks if "64 sessions" in check.name)
    pytest.importorskip("matplotlib")
    plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_repeats_report_the_median_of_their_passes(token_artifact: Path) -> None:
    options = replace(_micro(token_artifact), modes=("ort_floor",), repeats=3)
    passes: list[Row] = []
    [row] = run_bench(options, on_row=passes.append)
    assert len(passes) == 3
    assert row.chunks == sum(p.chunks for p in passes) and row.seconds == sum(p.seconds for p in passes)
    assert row.p50_ms == sorted(p.p50_ms for p in passes)[1]


def test_memory_mode_reports_per_session_bytes(token_artifact: Path) -> None:
    result = run_memory(MemoryOptions(token_artifact, sessions=300, channels=2))
    card = json.loads((token_artifact / "model.json").read_text())
    assert result.raw_state_bytes == 2 * card["layers"] * card["hidden"] * 4
    assert result.budget_bytes == 1.5 * result.raw_state_bytes + 512
    assert result.sessions == 300 and result.open_s > 0
    assert math.isfinite(result.bytes_per_session_fresh) and math.isfinite(result.bytes_per_session_idle)
    assert set(result.to_json()) >= {"bytes_per_session_idle", "raw_state_bytes", "met"}


def test_flags_pick_the_grid_and_quick_keeps_explicit_ones(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    quick = options_from_args(parser.parse_args(["--model", str(tmp_path), "--quick", "--seconds", "0.5"]))
    assert quick.sessions == (1, 64) and quick.seconds == 0.5 and quick.model_dir == tmp_path
    assert quick.one_stream_sessions == (64,)
    argv = ["--target", "127.0.0.1:1", "--sessions", "1,16", "--one-stream-sessions", "8"]
    argv += ["--frame-sessions", "32", "--frames-in-flight", "2", "--chunk-steps", "1"]
    target = options_from_args(parser.parse_args(argv))
    assert target.model_dir is None and target.sessions == (1, 16) and target.frames_in_flight == 2
    assert quick.frames_in_flight == 1
    assert {cell.mode for cell in plan(target)} == {"batched", "one_stream", "frames", "stateless"}
    assert [(c.sessions, c.channels) for c in plan(target) if c.mode == "one_stream"] == [(8, 1)]
    assert [(c.sessions, c.channels) for c in plan(target) if c.mode == "frames"] == [(32, 1)]
    bads = [{"model_dir": tmp_path, "modes": ("warp",)}, {}, {"model_dir": tmp_path, "seconds": 0}]
    for bad in [*bads, {"model_dir": tmp_path, "frames_in_flight": 0}]:
        with pytest.raises(BenchError):
            BenchOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(BenchError, match="no exported model in"):
        run_bench(BenchOptions(model_dir=tmp_path))


def test_rows_carry_every_documented_key() -> None:
    assert REQUIRED_KEYS | {"channels", "cpu_s_per_1k_steps"} <= {field.name for field in fields(Row)}


def test_versions_rows_cover_every_case_and_version(token_artifact: Path, tmp_path: Path) -> None:
    options = VersionsOptions(
        model_dir=token_artifact,
        sessions=2,
        chunk_steps=(3,),
        small_sessions=1,
        small_period_ms=5.0,
        channels=2,
        warmup_s=0.1,
        seconds=0.3,
        repeats=1,
    )
    run = run_versions(options)
    rows = run.rows
    assert len(run.passes) == 1 and run.passes[0] == rows
    assert [(r.case, r.version, r.sessions) for r in rows] == [
        ("one_version", "1", 2),
        ("two_busy", "1", 1),
        ("two_busy", "2", 1),
        ("two_busy", BOTH, 2),
        ("small_alone", "2", 1),
        ("small_busy", "1", 2),
        ("small_busy", "2", 1),
        ("small_busy", BOTH, 3),
    ]
    for row in rows:
        assert row.chunk_steps == 3 and row.chunks > 0 and row.seconds > 0
        assert row.timesteps_per_s > 0 and row.chunks_per_s > 0 and 0 < row.p50_ms <= row.p99_ms
        assert (row.period_ms == 5.0) == (row.case.startswith("small") and row.version == "2")
        whole = row.version == BOTH or row.case in ("one_version", "small_alone")  # the case's server figures
        assert (row.cpu_s_per_1k_steps is not None) == whole and (row.mean_batch is not None) == whole
    checks = check_versions(run, options)
    assert [check.bound for check in checks] == [0.95, 1]
    assert all(check.actual is not None and check.actual > 0 for check in checks)
    assert "ms alone" in summary(run, options)

    table = format_table(rows, COLUMNS).splitlines()
    assert len(table) == len(rows) + 1 and table[0].split()[:2] == ["case", "version"]
    write_json(rows, tmp_path / "versions.json")
    assert [row["case"] for row in json.loads((tmp_path / "versions.json").read_text())] == [
        r.case for r in rows
    ]
    pytest.importorskip("matplotlib")
    plot_versions(rows, tmp_path / "versions.png", options)
    assert (tmp_path / "versions.png").read_bytes()[:4] == b"\x89PNG"


def test_versions_flags_take_one_count_and_refuse_the_grids(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--versions", "--model", str(tmp_path), "--quick", "--sessions", "8", "--small-period-ms", "10"]
    options = versions_options_from_args(parser.parse_args(argv))
    assert (options.sessions, options.chunk_steps, options.repeats, options.small_period_ms) == (
        8,
        (1,),
        1,
        10,
    )
    for bad in (["--sessions", "8,16"], ["--modes", "batched"], ["--target", "127.0.0.1:1"]):
        with pytest.raises(BenchError):
            versions_options_from_args(parser.parse_args(["--versions", *bad]))
    with pytest.raises(BenchError):
        VersionsOptions(model_dir=tmp_path, sessions=1)
