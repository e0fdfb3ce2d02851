"""The synthetic tasks: registry, vocabulary, sentence structure, sensor signal, evaluation keys."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from training.model import ModelConfig, SequenceModel
from training.tasks import TASK_NAMES, UnknownTaskError, get_task
from training.tasks.language import (
    COUNTRIES,
    LANGUAGES,
    VOCABULARY,
    LanguageTask,
    LanguageTaskConfig,
    memoryless_gaps,
)
from training.tasks.sensor import MODES, SensorTask, SensorTaskConfig
from training.tasks.words import COUNTRY_LANGUAGE, FILLER_WORDS, FRAME_WORDS
from training.vocabulary import UnknownWordError

pytestmark = pytest.mark.timeout(60)


def test_registry_knows_both_tasks() -> None:
    assert set(TASK_NAMES) == {"language", "sensor"}
    assert [get_task(name).name for name in TASK_NAMES] == list(TASK_NAMES)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(UnknownTaskError, match="language, sensor") as info:
        get_task("weather")
    assert "weather" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_country_language_pairs_are_distinct() -> None:
    assert len(COUNTRY_LANGUAGE) >= 25
    assert len(set(COUNTRIES)) == len(COUNTRIES)
    assert len(set(LANGUAGES)) == len(LANGUAGES)
    assert not set(COUNTRIES) & set(LANGUAGES)


def test_fillers_never_contain_frame_country_or_language_words() -> None:
    assert len(FILLER_WORDS) >= 200
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS)
    assert not set(FILLER_WORDS) & (set(COUNTRIES) | set(LANGUAGES) | set(FRAME_WORDS))


def test_scored_position_is_fluent_followed_by_the_right_language() -> None:
    task = LanguageTask()
    batch = task.training_batch(16, difficulty=1.0, rng=np.random.default_rng(0))
    language_of = {VOCABULARY.encode(c)[0]: VOCABULARY.encode(lang)[0] for c, lang in COUNTRY_LANGUAGE}
    for row in range(16):
        ids = batch.x[row].tolist()
        countries = [i for i in ids if i in language_of]
        positions = torch.nonzero(batch.scored[row]).flatten().tolist()
        assert len(countries) - 1 <= len(positions) <= len(countries)  # the row may cut the last sentence
        assert all(a != b for a, b in itertools.pairwise(countries))  # memory must be overwritten
        for position, country in zip(positions, countries, strict=False):
            assert task.decode([ids[position]]) == "fluent"
            assert batch.targets[row, position].item() == language_of[country]
            assert batch.weights[row, position].item() > 10 * batch.weights[row, position - 1].item()


def test_gap_batch_has_the_requested_gaps() -> None:
    task = LanguageTask()
    batch = task.gap_batch([0, 7, 30], np.random.default_rng(1))
    for row, gap in enumerate([0, 7, 30]):
        text = " " + task.decode(batch.x[row].tolist())  # the longest row has no leading filler
        after_country = text.split(" i grew up in ")[1].split()
        assert after_country[1] == "."
        assert after_country[2 + gap : 2 + gap + 3] == ["i", "speak", "fluent"]


def test_memoryless_gaps_stay_within_bounds_with_the_asked_mean() -> None:
    gaps = memoryless_gaps(50.0, 200, 20000, np.random.default_rng(2))
    assert gaps.min() == 0
    assert gaps.max() <= 200
    assert 45 < gaps.mean() < 52  # truncation pulls the mean slightly below 50


def test_curriculum_limits_training_gaps() -> None:
    task = LanguageTask(LanguageTaskConfig(start_max_gap_words=3, train_max_gap_words=100))
    easy = task.training_batch(64, difficulty=0.0, rng=np.random.default_rng(3))
    hard = task.training_batch(64, difficulty=1.0, rng=np.random.default_rng(3))
    assert easy.x.shape[1] == 2 * 3 + 22  # rows: two maximal gaps plus two sentences' 11 frame words
    assert hard.x.shape[1] == 2 * 100 + 22
    for batch, max_gap in ((easy, 3), (hard, 100)):
        for row in batch.x.tolist():
            text = " " + LanguageTask().decode(row)
            for sentence in text.split(" i grew up in ")[1:-1]:  # complete sentences only
                gap = len(sentence.split(" i speak fluent ")[0].split()) - 2  # minus country and "."
                assert 0 <= gap <= max_gap


def test_encode_decode_round_trip_and_unknown_word() -> None:
    task = LanguageTask()
    text = "i grew up in france . the dog i speak fluent french ."
    assert task.decode(task.encode(text)) == text
    assert task.encode("In France.") == task.encode("in france .")
    with pytest.raises(UnknownWordError, match="'klingon'"):
        task.encode("i speak fluent klingon")
    with pytest.raises(UnknownWordError, match="out of range"):
        task.decode([len(VOCABULARY)])


def test_language_info_carries_the_vocabulary() -> None:
    info = LanguageTask().info()
    assert info.vocabulary == info.output_labels == list(VOCABULARY.words)
    assert LanguageTask().default_model_config().input_size == len(VOCABULARY)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_sequences_are_varied_and_typed(name: str) -> None:
    task = get_task(name)
    sequences = task.sample_sequences(8, np.random.default_rng(4))
    assert len(sequences) == 8
    assert len({len(s) for s in sequences}) > 1
    config = task.default_model_config()
    for s in sequences:
        if config.input_kind == "tokens":
            assert s.dtype == np.int64 and s.ndim == 1 and s.max() < config.input_size
        else:
            assert s.dtype == np.float32 and s.shape[1] == config.input_size


def test_sensor_burst_level_announces_the_mode() -> None:
    task = SensorTask(SensorTaskConfig(min_segment_steps=10, start_max_segment_steps=20))
    batch = task.training_batch(8, difficulty=0.0, rng=np.random.default_rng(5))
    assert batch.x.dtype == torch.float32 and batch.x.shape[-1] == 1 + task.config.sensor_channels
    in_burst = ~batch.scored  # only burst steps are left unscored
    bus = batch.x[..., 0][in_burst]
    expected = batch.targets[in_burst].float() + 1.0
    # burst level = mode + 1, up to bus noise and the odd glitch on top
    assert (bus - expected).abs().median() < 0.5
    assert set(torch.unique(batch.targets).tolist()) <= set(range(len(MODES)))
    changes = (batch.targets[:, 1:] != batch.targets[:, :-1]).sum()
    assert changes > 8  # several regime changes per stream


def test_evaluate_reports_every_bucket() -> None:
    task = LanguageTask(LanguageTaskConfig(eval_buckets_words=((0, 5), (5, 10)), eval_sentences_per_bucket=4))
    config = ModelConfig("tokens", len(VOCABULARY), len(VOCABULARY), hidden_size=4, embed_size=4)
    metrics = task.evaluate(SequenceModel(config).eval(), np.random.default_rng(6))
    assert set(metrics) == {
        "language_word_acc_gap_0_5",
        "language_word_acc_gap_5_10",
        "language_word_acc_worst_bucket",
        "language_word_acc_overwrite",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert task.headline_metric() in metrics


def test_sensor_evaluate_reports_distance_buckets() -> None:
    task = SensorTask(
        SensorTaskConfig(eval_max_segment_steps=60, eval_since_buckets_steps=((0, 20),), eval_streams=3)
    )
    metrics = task.evaluate(SequenceModel(task.default_model_config()).eval(), np.random.default_rng(7))
    assert set(metrics) == {"mode_acc", "mode_acc_since_0_20"}
