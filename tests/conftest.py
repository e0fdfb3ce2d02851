"""Shared fixtures: small exported artifacts for everyone's tests.

`token_artifact` and `feature_artifact` are artifact directories (checkpoint.pt, model.onnx, model.json) of
RANDOM-INITIALISED, untrained LSTMs: the outputs mean nothing; the shapes, state handling and card are real.
Each is built once per test session, in well under a second. torch and the training/export packages are
imported inside the fixtures only, so serving tests that do not use them run where torch is not installed;
where it is not, the fixtures skip the tests that ask for them.

    def test_serves(token_artifact: Path) -> None:
        card = json.loads((token_artifact / "model.json").read_text())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from serving_harness import SILERO_DATA, card_silero, running

if TYPE_CHECKING:
    from training.model import CellKind

# save_random_checkpoint's signature: (directory, task_name, *, cell, layers, hidden, seed) -> directory
CheckpointFactory = Callable[..., Path]


def save_random_checkpoint(
    directory: Path,
    task_name: str,
    *,
    cell: CellKind = "lstm",
    layers: int = 1,
    hidden: int = 16,
    seed: int = 0,
) -> Path:
    """Save an untrained `task_name` model (its default config, shrunk) as `directory/checkpoint.pt`."""
    pytest.importorskip("torch")
    from dataclasses import replace

    import torch

    from training.checkpoint import save_checkpoint
    from training.model import SequenceModel
    from training.tasks import get_task

    torch.set_num_threads(1)  # two shared cores; these models are tiny anyway
    torch.manual_seed(seed)
    task = get_task(task_name)
    config = replace(
        task.default_model_config(), cell=cell, num_layers=layers, hidden_size=hidden, embed_size=8
    )
    save_checkpoint(directory, SequenceModel(config), config, task.info(), step=0, metrics={"untrained": 1.0})
    return directory


@pytest.fixture
def random_checkpoint() -> CheckpointFactory:
    """`save_random_checkpoint`, for tests that need a fresh directory (e.g. to break or re-export it)."""
    return save_random_checkpoint


def _exported(directory: Path, task: str, layers: int, hidden: int, cell: CellKind = "lstm") -> Path:
    from export import export_artifact

    export_artifact(save_random_checkpoint(directory, task, cell=cell, layers=layers, hidden=hidden))
    return directory


@pytest.fixture(scope="session")
def token_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported artifact `language`: tokens in (the language task's vocabulary), 1 layer, hidden 32."""
    return _exported(tmp_path_factory.mktemp("artifacts") / "language", "language", layers=1, hidden=32)


@pytest.fixture(scope="session")
def feature_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported artifact `sensor`: float32 features in (the sensor task's channels), 2 layers, hidden 16."""
    return _exported(tmp_path_factory.mktemp("artifacts") / "sensor", "sensor", layers=2, hidden=16)


@pytest.fixture(scope="session")
def gru_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported GRU `sensor`: features in, 2 layers, hidden 16; its state is h alone."""
    return _exported(tmp_path_factory.mktemp("artifacts") / "sensor-gru", "sensor", 2, 16, cell="gru")


@pytest.fixture(scope="session")
def rnn_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported plain RNN `language`: tokens in, 1 layer, hidden 24; its state is h alone."""
    return _exported(tmp_path_factory.mktemp("artifacts") / "language-rnn", "language", 1, 24, cell="rnn")


@pytest.fixture(scope="session")
def vad_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """silero VAD's silero_vad.onnx from its wheel, carded for 16 kHz: a framed model (samples in)."""
    if SILERO_DATA is None:
        pytest.skip("the silero-vad wheel is not installed (a dev dependency)")
    return card_silero(tmp_path_factory.mktemp("artifacts") / "silero-vad-16k")


# A real server per test module on a free port, for tests that talk to it through a target string.
@pytest.fixture(scope="module")
def token_target(token_artifact: Path) -> Iterator[str]:
    with running(token_artifact) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def feature_target(feature_artifact: Path) -> Iterator[str]:
    with running(feature_artifact) as server:
        yield f"127.0.0.1:{server.port}"
