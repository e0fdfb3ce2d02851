"""The demo's story through a real in-process server, one for both models."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from serving.cli.demo import CALLS, DemoOptions, run_demo


@pytest.mark.timeout(60)
def test_story_with_untrained_models(token_artifact: Path, rnn_artifact: Path, tmp_path: Path) -> None:
    for artifact in (token_artifact, rnn_artifact):
        shutil.copytree(artifact, tmp_path / artifact.name)
    out = io.StringIO()
    options = DemoOptions(artifacts=tmp_path, model=token_artifact.name, rnn_model=rnn_artifact.name)
    result = run_demo(options, out)
    text = out.getvalue()
    served = (f"{token_artifact.name}/1", f"{rnn_artifact.name}/1")
    assert result.served == served
    assert f"one server for both models: {', '.join(served)}" in text
    assert result.session_id and result.connections == CALLS
    assert 0 < result.remembered.probability <= 1 and 0 <= result.fresh.probability_of_answer <= 1
    assert result.latency.chunks == CALLS + 2  # the fresh session's chunk, and the short-gap question
    assert f"latency of {token_artifact.name} (server /metrics): {CALLS + 2} chunks" in text  # LSTM's only
    assert result.latency.p50_s <= result.latency.p99_s and result.latency.mean_inference_s > 0
    assert [f"call {n}" in text for n in range(1, CALLS + 2)] == [True] * (CALLS + 1)
    assert f"session {result.session_id}, issued by the server" in text
    assert f"calls to {rnn_artifact.name} on the same server, a plain RNN (RNN 1 x 24" in text
    for answers in (result.rnn.long_gap, result.rnn.short_gap, result.short_gap):
        assert 0 <= answers.probability_of_answer <= 1
    assert f"words back, over {CALLS} calls" in text and "LSTM    RNN" in text
    assert text.rstrip().endswith("server stopped")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_trains_exports_and_tells_the_story(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(DemoOptions(artifacts=tmp_path, train_max_steps=20), out)
    assert (tmp_path / "language" / "model.onnx").is_file()
    assert (tmp_path / "language-rnn" / "model.onnx").is_file()
    assert "training and exporting" in out.getvalue() and result.remembered.word
