"""`conveyor bench --audio` at a tiny size against a real server (silero VAD): every mode's rows, the search's
schedule, the floor, the table, the JSON and the plot, and the pacing they rest on.

No speed assertions: whether a count is held is for the bench to report, not for a test on a shared machine
to judge; the structure holds either way.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest

from serving.bench.audio import check_aims, most_held, plot_audio, run_audio, search
from serving.bench.audio_grid import AUDIO_MODES, COLUMNS, AudioOptions, AudioRow
from serving.bench.cli import add_arguments, audio_options_from_args
from serving.bench.grid import BenchError
from serving.bench.pacing import Pacing
from serving.bench.report import format_table, write_json

pytestmark = pytest.mark.timeout(240)


def _tiny(model_dir: Path) -> AudioOptions:
    return AudioOptions(
        model_dir=model_dir, first_streams=2, most_streams=4, fine_steps=1, warmup_s=0.1, seconds=0.5
    )


def test_audio_rows_at_a_tiny_size(vad_artifact: Path, tmp_path: Path) -> None:
    pytest.importorskip("silero_vad.utils_vad")  # silero's loop needs torch: a row saying so otherwise
    seen: list[AudioRow] = []
    options = _tiny(vad_artifact)
    rows = run_audio(options, on_row=seen.append)
    assert seen == rows
    modes = [row.mode for row in rows]
    assert modes == sorted(modes, key=AUDIO_MODES.index) and set(modes) == set(AUDIO_MODES)
    assert modes.count("ort_floor") == 1
    windows_per_stream_s = options.rate / 512
    for row in rows:
        assert row.note == "" or row.mode == "ort_floor"
        assert row.windows > 0 and row.seconds > 0 and row.windows_per_s > 0
        assert row.p50_ms is not None and row.p99_ms is not None and 0 < row.p50_ms <= row.p99_ms
        assert row.cpu_ms_per_window is not None and row.cpu_ms_per_window > 0
        if row.mode == "ort_floor":
            assert row.held is None and row.dropped is None and row.load_cpu_ms_per_window is None
            assert row.streams == math.floor(row.windows_per_s / windows_per_stream_s)
            assert row.mean_batch is not None and f"batches of {int(row.mean_batch)} windows" in row.note
            continue
        assert row.held == (row.dropped == 0 and row.p99_ms < 32.0)
        assert row.dropped is not None and row.dropped >= 0
        assert 1 <= row.streams <= 4 and row.mean_batch is not None and row.mean_batch >= 1
        # Windows owed are counted by due time: every stream's 31.25 a second, give or take the edges.
        assert row.windows == pytest.approx(row.streams * windows_per_stream_s * row.seconds, abs=row.streams)
        in_process = row.mode == "silero_loop"  # no server: the loop's own CPU, one ORT call per window
        assert (row.load_cpu_ms_per_window is None) == in_process
        assert not in_process or row.mean_batch == 1
    for mode in ("frames", "stream", "silero_loop"):
        assert next(row.streams for row in rows if row.mode == mode) == 2  # the search starts at the first

    held = most_held(rows)
    assert "ort_floor" in held and all(row.held for mode, row in held.items() if mode != "ort_floor")
    assert [check.name for check in check_aims(rows)] == [
        "audio: frames streams held / silero loop streams held",
        "audio: frames streams held / ort_floor streams",
    ]
    table = format_table(rows, COLUMNS).splitlines()
    assert len(table) == len(rows) + 1 and table[0].split()[:3] == ["mode", "streams", "windows/s"]
    write_json(rows, tmp_path / "audio.json")
    saved = json.loads((tmp_path / "audio.json").read_text())
    assert [row["mode"] for row in saved] == modes
    assert set(saved[0]) == {field.name for field in fields(AudioRow)}
    pytest.importorskip("matplotlib")
    plot_audio(rows, tmp_path / "audio.png", options)
    assert (tmp_path / "audio.png").read_bytes()[:4] == b"\x89PNG"


def _row(streams: int, held: bool) -> AudioRow:
    return AudioRow("frames", streams, 1.0, 1.0, 1.0, 0, held, 0.1, 0.1, 1.0, 1, 1.0)


@pytest.mark.parametrize(
    ("most_held_count", "tried"),
    [
        (1000, [32, 64, 128, 256]),  # held up to the most: no fine steps
        (100, [32, 64, 128, 96, 112, 104]),  # coarse to 128, then three bisections
        (20, [32, 16, 24, 20]),  # the first count missed: bisected down from it
    ],
)
def test_the_search_doubles_while_held_then_bisects(most_held_count: int, tried: list[int]) -> None:
    counts: list[int] = []

    def measure(streams: int) -> AudioRow:
        counts.append(streams)
        return _row(streams, streams <= most_held_count)

    search(measure, AudioOptions(model_dir=Path(), first_streams=32, most_streams=256, fine_steps=3))
    assert counts == tried


def test_streams_start_at_staggered_window_phases() -> None:
    pacing = Pacing(streams=16, chunk=320, rate=16000, window=512, aligned=True)
    assert pacing.period_s == 0.02 and pacing.cycle_s == pytest.approx(0.16) and pacing.window_s == 0.032
    ticks = pacing.ticks()
    first = [next(ticks) for _ in range(16)]
    # Aligned (a gateway's): every chunk due on its tick; two streams start on each of the 8 ticks.
    assert [len(tick) for tick in first[:8]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all(due.due_s == pytest.approx(number * 0.02) for number, tick in enumerate(first) for due in tick)
    # Once all have started, every tick completes the same share of windows (5 of 8 chunks complete one).
    assert {sum(pacing.windows(due.number) for due in tick) for tick in first[8:]} == {10}
    spread = Pacing(streams=16, chunk=320, rate=16000, window=512, aligned=False)
    tick = next(spread.ticks())
    assert [round(due.due_s, 4) for due in tick] == [0.0, 0.01]  # its own clock: within the tick too


def test_audio_flags_pick_the_options_and_refuse_the_grids(tmp_path: Path, token_artifact: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--audio", "--model", str(tmp_path), "--audio-streams", "8,64", "--seconds", "2"]
    options = audio_options_from_args(parser.parse_args([*argv, "--modes", "frames,ort_floor"]))
    assert (options.first_streams, options.most_streams, options.seconds) == (8, 64, 2.0)
    assert options.modes == ("frames", "ort_floor") and options.fine_steps == 3
    assert audio_options_from_args(parser.parse_args(["--audio", "--quick"])).fine_steps == 2
    for bad in (["--sessions", "4"], ["--target", "127.0.0.1:1"], ["--audio-streams", "8"], ["--modes", "x"]):
        with pytest.raises(BenchError):
            audio_options_from_args(parser.parse_args(["--audio", *bad]))
    with pytest.raises(BenchError, match="framed model"):
        run_audio(AudioOptions(model_dir=token_artifact))  # refused before any process starts
