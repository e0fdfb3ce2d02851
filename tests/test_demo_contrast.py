"""The demo's claim on the models `make demo` trained (artifacts/language, artifacts/language-rnn): over many
held-out sentences streamed through a real server, the LSTM carries the country across the story's gap and
the plain RNN does not, though it does across three words. `.ci/run` runs `make demo` first, so on a clean
clone this holds the models that clone trained."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from serving.cli.demo import DemoOptions, run_demo
from serving.cli.demo_contrast import SENTENCES

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
MODELS = ("language", "language-rnn")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not all((ARTIFACTS / model / "model.onnx").is_file() for model in MODELS),
        reason="the demo's models are not trained: run `make demo` first",
    ),
]


def test_the_lstm_carries_the_country_across_the_storys_gap_and_the_rnn_does_not() -> None:
    result = run_demo(DemoOptions(artifacts=ARTIFACTS), io.StringIO())
    lstm, rnn = result.accuracy["lstm"], result.accuracy["rnn"]
    assert result.sentences == SENTENCES >= 200
    assert lstm.long_gap >= 0.95, lstm
    assert rnn.long_gap <= 0.3, rnn
    assert lstm.short_gap >= 0.95 and rnn.short_gap >= 0.7, (lstm, rnn)  # the RNN did learn the task
    assert result.remembered.word == "french"
    assert result.served == ("language/1", "language-rnn/1")  # one server for both
