"""Training smoke run, artifact files, determinism, and the checkpoint round trip and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, TaskInfo, load_checkpoint, save_checkpoint
from training.loop import FitOptions
from training.model import ModelConfig, SequenceModel
from training.tasks import UnknownTaskError
from training.tasks.language import LanguageTask, LanguageTaskConfig
from training.train import TrainOptions, train

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
