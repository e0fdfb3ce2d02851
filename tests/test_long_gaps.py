"""The served language model (the LSTM `make demo` trains) carries the country across 300 and 500 words of
filler whose make-up training never produced: everyday sentences in random order, words of skewed
frequencies, long loops; alone and after a first sentence with another country, which it must overwrite.
Each cell is 200 held-out sentences streamed through a real server in chunks of 1-64 words over several
connections.
`.ci/run` runs `make demo` first, so on a clean clone this holds the model that clone trained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_harness import running

from serving.cli.demo_contrast import held_out_sentences, streamed_accuracy
from serving.client import ConveyorClient

ARTIFACT = Path(__file__).resolve().parent.parent / "artifacts" / "language"
UNSEEN_KINDS = ("phrases", "skewed", "long_loop")
SENTENCES = 200

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (ARTIFACT / "model.onnx").is_file(),
        reason="no demo LSTM: run `make demo` first",
    ),
]


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with running(ARTIFACT, max_batch_size=64) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("before", [False, True], ids=["alone", "after another country"])
@pytest.mark.parametrize("kind", UNSEEN_KINDS)
@pytest.mark.parametrize("gap", [300, 500])
def test_the_country_survives_unseen_fillers(target: str, gap: int, kind: str, before: bool) -> None:
    with ConveyorClient(target) as client:
        info = client.model_info()
    sentences = held_out_sentences(info, gap, SENTENCES, kind=kind, before=before)
    assert streamed_accuracy(target, sentences, most_words=64) >= 0.99
