"""What a task gives the training loop: batches with per-position loss weights, and its own evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from training.checkpoint import TaskInfo
from training.model import ModelConfig, SequenceModel


@dataclass(frozen=True)
class Batch:
    """One batch of streams, all starting from zero state."""

    x: torch.Tensor  # int64 (B, T) token ids, or float32 (B, T, F) features
    targets: torch.Tensor  # int64 (B, T): the class expected at each step; regression: float32 (B, T, K)
    weights: torch.Tensor  # float32 (B, T): loss weight of each step; 0 = not trained on
    scored: torch.Tensor  # bool (B, T): the steps that count for accuracy (the task's headline prediction)


class Task(Protocol):
    """A synthetic sequence task: data generation, the model it suggests, and its evaluation."""

    name: str
    curriculum: bool  # whether `difficulty` means anything: the loop then starts easy

    def info(self) -> TaskInfo:
        """What the model's inputs and outputs mean (travels in the checkpoint)."""
        ...

    def default_model_config(self) -> ModelConfig:
        """The model this task trains by default."""
        ...

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        """A fresh training batch; `difficulty` in [0, 1] is the curriculum's stage (1 = full difficulty)."""
        ...

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """A batch at full training difficulty, for validation and early stopping."""
        ...

    def evaluate(self, model: SequenceModel, rng: np.random.Generator) -> dict[str, float]:
        """Held-out evaluation beyond the training distribution; returns named figures for metrics.json."""
        ...

    def headline_metric(self) -> str:
        """The key in `evaluate`'s result that summarises the model in one number."""
        ...

    def sample_sequences(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """`n` realistic held-out inputs of varied lengths: int64 (T,) ids or float32 (T, F) features."""
        ...


@torch.no_grad()
def scored_accuracy(model: SequenceModel, batch: Batch) -> float:
    """Fraction of the batch's scored steps where the argmax over all outputs is the target."""
    y, _ = model(batch.x, model.init_state(batch.x.shape[0]))  # y: (B, T, V)
    hits = (y.argmax(dim=-1) == batch.targets)[batch.scored]
    return float(hits.float().mean())
