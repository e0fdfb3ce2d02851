"""Training smoke run, artifact files, determinism, and the checkpoint round trip and its errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serving.cli.main import main
from training.checkpoint import CheckpointError, TaskInfo, load_checkpoint, save_checkpoint
from training.loop import FitOptions
from training.model import ModelConfig, SequenceModel
from training.tasks import UnknownTaskError
from training.tasks.language import LanguageTask, LanguageTaskConfig
from training.train import TrainOptionError, TrainOptions, train

pytestmark = pytest.mark.timeout(120)

_TINY = TrainOptions(
    hidden_size=8,
    show_progress=False,
    fit=FitOptions(
        max_steps=12, batch_size=4, eval_every_steps=5, validation_batches=1, curriculum_window_steps=4
    ),
)


@pytest.fixture(scope="module")
def sensor_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sensor")
    train("sensor", out, _TINY)
    return out


def test_training_writes_all_artifacts(sensor_run: Path) -> None:
    assert {p.name for p in sensor_run.iterdir()} >= {
        "checkpoint.pt",
        "metrics.json",
        "curves.png",
        "train_config.json",
    }
    assert (sensor_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_hold_the_headline_and_the_curves(sensor_run: Path) -> None:
    metrics = json.loads((sensor_run / "metrics.json").read_text())
    assert metrics["task"] == "sensor"
    assert metrics["headline_metric"] == "mode_acc"
    assert 0.0 <= metrics["headline_value"] <= 1.0
    assert metrics["steps"] == 12
    assert metrics["parameters"] > 0
    assert len(metrics["history"]["train_loss"]) == 12
    assert metrics["history"]["val_step"] == [5, 10, 12]


def test_train_config_records_model_and_options(sensor_run: Path) -> None:
    config = json.loads((sensor_run / "train_config.json").read_text())
    assert config["model"]["hidden_size"] == 8
    assert config["options"]["fit"]["max_steps"] == 12
    assert config["task_config"]["sensor_channels"] == 5


def test_checkpoint_describes_itself(sensor_run: Path) -> None:
    checkpoint = load_checkpoint(sensor_run)
    assert checkpoint.config.input_kind == "features"
    assert checkpoint.task.output_labels == ["idle", "low", "medium", "high"]
    assert checkpoint.metrics["headline_metric"] == "mode_acc"
    assert not checkpoint.model.training


def test_same_seed_gives_the_same_weights(tmp_path: Path, sensor_run: Path) -> None:
    train("sensor", tmp_path, _TINY)
    first = load_checkpoint(sensor_run).model.state_dict()
    second = load_checkpoint(tmp_path).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_language_training_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real evaluation runs thousands of sentences up to 500 words: seconds matter here, not figures.
    small = LanguageTask(LanguageTaskConfig(eval_buckets_words=((0, 10),), eval_sentences_per_bucket=4))
    monkeypatch.setattr("training.train.get_task", lambda name: small)
    result = train("language", tmp_path, _TINY)
    assert result.headline_metric == "language_word_acc_worst_bucket"
    assert "language_word_acc_overwrite" in result.metrics
    assert load_checkpoint(tmp_path).task.vocabulary is not None


def test_a_short_gap_rnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = LanguageTask(LanguageTaskConfig(eval_buckets_words=((0, 10),), eval_sentences_per_bucket=4))
    monkeypatch.setattr("training.train.get_task", lambda name: small)
    options = replace(_TINY, cell="rnn", max_gap_words=4, fit=replace(_TINY.fit, learning_rate=3e-3))
    train("language", tmp_path, options)
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["model"]["cell"] == "rnn"
    assert config["task_config"]["train_max_gap_words"] == 4
    assert config["task_config"]["start_max_gap_words"] == 4  # the curriculum cannot start above the top
    assert config["options"]["fit"]["learning_rate"] == 3e-3
    assert load_checkpoint(tmp_path).config.cell == "rnn"


def test_a_maximum_gap_is_for_the_language_task_only(tmp_path: Path) -> None:
    with pytest.raises(TrainOptionError, match="language task only"):
        train("sensor", tmp_path, replace(_TINY, max_gap_words=4))


def test_the_train_command_passes_its_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrainOptions] = []

    def fake_train(task: str, out: Path, options: TrainOptions) -> object:
        seen.append(options)
        return SimpleNamespace(wall_time_s=0.0, steps=1, headline_metric="m", headline_value=0.0, out_dir=out)

    monkeypatch.setattr("training.train.train", fake_train)
    flags = (
        "--cell rnn --hidden-size 93 --max-gap-words 4 --max-steps 2500 --learning-rate 0.01 --grad-clip 0.25"
    )
    assert main(["train", "--task", "language", "--out", str(tmp_path), *flags.split()]) == 0
    assert main(["train", "--task", "language", "--out", str(tmp_path)]) == 0
    given, default = seen
    assert (given.cell, given.hidden_size, given.max_gap_words) == ("rnn", 93, 4)
    assert (given.fit.max_steps, given.fit.learning_rate, given.fit.grad_clip_norm) == (2500, 0.01, 0.25)
    assert default == TrainOptions()  # no flags: the defaults, unchanged


def test_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(UnknownTaskError, match="language, sensor"):
        train("weather", tmp_path, _TINY)


def _saved(directory: Path) -> SequenceModel:
    torch.manual_seed(0)
    config = ModelConfig("tokens", input_size=5, output_size=5, hidden_size=4, embed_size=3)
    model = SequenceModel(config)
    info = TaskInfo("language", list("abcde"), list("abcde"), "next-word logits over the vocabulary")
    save_checkpoint(directory, model, config, info, step=7, metrics={"acc": 0.5})
    return model


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    loaded = load_checkpoint(tmp_path)
    x = torch.tensor([[0, 3, 4, 1]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(x, loaded.model.init_state(1))[0], model(x, model.init_state(1))[0]
        )
    assert (loaded.step, loaded.metrics, loaded.task.vocabulary) == (7, {"acc": 0.5}, list("abcde"))
    assert loaded.config == model.config


def test_missing_directory_or_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint\.pt in .*train first"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no checkpoint\.pt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_keys", "wrong_shapes"])
def test_corrupt_checkpoint(tmp_path: Path, damage: str) -> None:
    _saved(tmp_path)
    path = tmp_path / "checkpoint.pt"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "wrong_keys":
        torch.save({"weights": {}}, path)
    else:
        payload = torch.load(path, weights_only=True)
        payload["config"]["hidden_size"] = 6
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="corrupt or not a Conveyor checkpoint"):
        load_checkpoint(tmp_path)
