"""`conveyor stream` logic against a real server: printed predictions, saved outputs, and its clear errors."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_harness import card, offline, sequence

from serving.cli.main import main
from serving.cli.stream import StreamError, StreamOptions, encode_text, stream

pytestmark = pytest.mark.timeout(60)
ATOL = 1e-5
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
TEXT = "i grew up in France. later we moved to the city and my father found a new job there"


def vocabulary(artifact: Path) -> list[str]:
    words: list[str] = card(artifact)["vocabulary"]
    return words


def run(options: StreamOptions) -> list[str]:
    out = io.StringIO()
    stream(options, out)
    return out.getvalue().splitlines()


def test_encode_text_splits_punctuation_and_ignores_case() -> None:
    ids = encode_text("I grew up in France.", ["i", "grew", "up", "in", "france", "."])
    assert ids.tolist() == [0, 1, 2, 3, 4, 5]


def test_text_prints_top_predictions_after_each_chunk(
    token_target: str, token_artifact: Path, tmp_path: Path
) -> None:
    source = tmp_path / "story.txt"
    source.write_text(TEXT)
    words = vocabulary(token_artifact)
    ids = encode_text(TEXT, words)
    lines = run(StreamOptions(token_target, str(source), chunk_steps=4, top_k=2, progress=False))
    expected = offline(token_artifact, ids)
    assert len(lines) == -(-len(ids) // 4)
    for number, line in enumerate(lines):
        last = min(4 * number + 3, len(ids) - 1)
        assert line.startswith(f"steps {f'{4 * number}-{last}':>11} ")
        shown = re.findall(r"(\S+) (0\.\d{3})", line.split("->")[1])
        assert len(shown) == 2
        assert shown[0][0] == words[int(np.argmax(expected[last]))]


def test_output_file_holds_every_timestep(token_target: str, token_artifact: Path, tmp_path: Path) -> None:
    source, target = tmp_path / "story.txt", tmp_path / "out.npy"
    source.write_text(TEXT)
    lines = run(StreamOptions(token_target, str(source), chunk_steps=5, output=target, progress=False))
    ids = encode_text(TEXT, vocabulary(token_artifact))
    np.testing.assert_allclose(np.load(target), offline(token_artifact, ids), atol=ATOL)
    assert lines == [
        f"wrote {target}: outputs of shape {(len(ids), len(vocabulary(token_artifact)))} float32"
    ]


def test_kept_session_goes_on_at_its_offset(token_target: str, token_artifact: Path, tmp_path: Path) -> None:
    first, second, target = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "out.npy"
    first.write_text("i grew up in france .")
    second.write_text("i speak fluent")
    kept = stream(StreamOptions(token_target, str(first), keep=True, progress=False), io.StringIO())
    assert not kept.ended and kept.steps == 6
    options = StreamOptions(
        token_target,
        str(second),
        session_id=kept.session_id,
        offset=kept.steps,
        output=target,
        progress=False,
    )
    assert stream(options, io.StringIO()).ended
    ids = encode_text("i grew up in france . i speak fluent", vocabulary(token_artifact))
    np.testing.assert_allclose(np.load(target), offline(token_artifact, ids)[6:], atol=ATOL)


def test_csv_with_header_prints_labels(feature_target: str, feature_artifact: Path, tmp_path: Path) -> None:
    rows = sequence(feature_artifact, 10, seed=0)
    size = rows.shape[1]
    source = tmp_path / "signal.csv"
    header = ",".join(f"ch{i}" for i in range(size))
    np.savetxt(source, rows, delimiter=",", header=header, comments="")
    lines = run(StreamOptions(feature_target, str(source), chunk_steps=4, progress=False))
    labels = card(feature_artifact)["output"]["labels"]
    expected = offline(feature_artifact, np.loadtxt(source, delimiter=",", skiprows=1, dtype=np.float32))
    assert [line.split("-> ")[1].split(" (")[0] for line in lines] == [
        labels[int(np.argmax(expected[last]))] for last in (3, 7, 9)
    ]


def test_npy_features_to_output(feature_target: str, feature_artifact: Path, tmp_path: Path) -> None:
    rows = sequence(feature_artifact, 9, seed=1)
    source, target = tmp_path / "signal.npy", tmp_path / "out.npy"
    np.save(source, rows)
    run(StreamOptions(feature_target, str(source), chunk_steps=2, output=target, progress=False))
    np.testing.assert_allclose(np.load(target), offline(feature_artifact, rows), atol=ATOL)


def test_unknown_word_is_named(token_target: str, tmp_path: Path) -> None:
    source = tmp_path / "story.txt"
    source.write_text("i grew up in atlantis .")
    with pytest.raises(StreamError, match="unknown word 'atlantis'"):
        run(StreamOptions(token_target, str(source), progress=False))


def test_wrong_feature_count_is_explained(feature_target: str, tmp_path: Path) -> None:
    source = tmp_path / "signal.csv"
    np.savetxt(source, np.zeros((4, 2)), delimiter=",")
    with pytest.raises(StreamError, match="features per timestep, got 4x2"):
        run(StreamOptions(feature_target, str(source), progress=False))


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    target, source = UNREACHABLE, tmp_path / "story.txt"
    source.write_text(TEXT)
    options = StreamOptions(target, str(source), connect_timeout_s=0.3, progress=False)
    with pytest.raises(StreamError, match=f"cannot reach a Conveyor server at {target}"):
        run(options)


def test_missing_input_fails_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(StreamError, match=f"cannot read {missing}: No such file"):
        run(StreamOptions(UNREACHABLE, str(missing), progress=False))


def test_command_line_prints_results_and_one_line_errors(
    token_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("i grew up in france .")
    bad.write_text("i grew up in atlantis .")
    assert main(["stream", "--target", token_target, "--chunk-steps", "3", str(good)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["stream", "--target", token_target, str(bad)]) == 1
    assert "conveyor stream: error: unknown word 'atlantis'" in capsys.readouterr().err
    assert main(["stream", "--target", UNREACHABLE, str(good)]) == 1
    errors = capsys.readouterr().err
    assert f"cannot reach a Conveyor server at {UNREACHABLE}" in errors and "Traceback" not in errors


def test_the_installed_console_script_runs() -> None:
    """`conveyor` as pip installed it (the entry point in pyproject.toml), not `main` imported by a test."""
    script = Path(sys.executable).with_name("conveyor")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "stream" in result.stdout
