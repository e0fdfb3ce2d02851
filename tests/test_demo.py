"""The demo's story through a real in-process server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from serving.cli.demo import CALLS, DemoOptions, run_demo


@pytest.mark.timeout(60)
def test_story_with_an_untrained_model(token_artifact: Path) -> None:
    out = io.StringIO()
    result = run_demo(DemoOptions(artifacts=token_artifact.parent, model=token_artifact.name), out)
    text = out.getvalue()
    assert result.session_id and result.connections == CALLS
    assert 0 < result.remembered.probability <= 1 and 0 <= result.fresh.probability_of_answer <= 1
    assert result.latency.chunks == CALLS + 1  # the fresh session's one chunk too
    assert result.latency.p50_s <= result.latency.p99_s and result.latency.mean_inference_s > 0
    assert [f"call {n}" in text for n in range(1, CALLS + 2)] == [True] * (CALLS + 1)
    assert f"session {result.session_id}, issued by the server" in text
    assert text.rstrip().endswith("server stopped")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_trains_exports_and_tells_the_story(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(DemoOptions(artifacts=tmp_path, train_max_steps=20), out)
    assert (tmp_path / "language" / "model.onnx").is_file()
    assert "training and exporting" in out.getvalue() and result.remembered.word
