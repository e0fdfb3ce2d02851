"""The optimisation loop shared by `train` and the gap sweep.

Adam with gradient clipping and a cosine learning-rate decay, a curriculum that advances when the current
stage is learnt, validation, and early stopping that keeps the best weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from training.model import SequenceModel
from training.tasks.base import Batch


class BatchSource(Protocol):
    """Where the loop gets its data: a task, or the sweep's fixed-gap variant of one."""

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch: ...

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch: ...


@dataclass(frozen=True)
class FitOptions:
    """Optimisation budget and schedule."""

    max_steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-2
    # Cosine decay to this fraction of the rate. The LM positions' irreducible loss keeps Adam's steps noisy;
    # letting them shrink at the end is what made the memory hold beyond the training gaps (measured: the
    # 400-500 gap bucket went from 0.54 to 0.995 with everything else equal).
    final_lr_fraction: float = 0.01
    grad_clip_norm: float = 1.0  # recurrent gradients spike
    # Curriculum: advance by `curriculum_increment` once the last window's accuracy reaches the threshold.
    # Advancing on a fixed schedule instead raised the difficulty before anything was learnt.
    curriculum: bool = True  # False: every batch at full difficulty from the first step (data files)
    curriculum_window_steps: int = 50
    curriculum_advance_accuracy: float = 0.95
    curriculum_increment: float = 0.1
    eval_every_steps: int = 100
    patience_evals: int | None = 4  # validations at full difficulty without a better loss; None: never stop
    min_loss_improvement: float = 1e-4
    validation_batches: int = 4


@dataclass(frozen=True)
class FitResult:
    """How a fit went: the best validation step (whose weights the model holds) and the curves."""

    steps: int
    best_step: int
    best_val_loss: float
    history: dict[str, list[float]]


_CURVES = ("step", "train_loss", "train_acc", "difficulty", "val_step", "val_loss", "val_acc")


@dataclass
class _State:
    """The loop's mutable bookkeeping."""

    history: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in _CURVES})
    difficulty: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    stale_evals: int = 0


def fit(
    source: BatchSource,
    model: SequenceModel,
    options: FitOptions,
    rngs: tuple[np.random.Generator, np.random.Generator],
    progress_label: str | None = None,
) -> FitResult:
    """Train `model` in place on batches from `source`, leaving it with its best validation weights.

    `rngs` are the training-data and validation-data generators; `progress_label` shows a tqdm bar.
    """
    train_rng, validation_rng = rngs
    validation = [
        source.validation_batch(options.batch_size, validation_rng) for _ in range(options.validation_batches)
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    state = _State(difficulty=0.0 if options.curriculum else 1.0)
    steps = range(1, options.max_steps + 1)
    bar = tqdm(steps, desc=progress_label, unit="step", disable=progress_label is None)
    for step in bar:
        _set_learning_rate(optimizer, options, step)
        batch = source.training_batch(options.batch_size, state.difficulty, train_rng)
        loss, accuracy = train_step(model, optimizer, batch, options.grad_clip_norm)
        _record(state.history, step=step, train_loss=loss, train_acc=accuracy, difficulty=state.difficulty)
        _advance_curriculum(state, options, step)
        if step % options.eval_every_steps == 0 or step == options.max_steps:
            val_loss, val_acc = validate(model, validation)
            _record(state.history, val_step=step, val_loss=val_loss, val_acc=val_acc)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", val_acc=f"{val_acc:.3f}")
            if _should_stop(state, model, step, val_loss, options):
                break
    model.load_state_dict(state.best_weights or model.state_dict())
    model.eval()
    return FitResult(step, state.best_step, state.best_loss, state.history)


def loss_and_accuracy(model: SequenceModel, batch: Batch) -> tuple[torch.Tensor, float]:
    """Classification: weighted cross-entropy over all steps, and accuracy on the scored steps (argmax over
    all outputs). Regression (float targets (B, T, K)): weighted squared error, and R^2 on the scored steps
    (the figure that plays accuracy's part: 1 is perfect, 0 no better than the mean)."""
    y, _ = model(batch.x, model.init_state(batch.x.shape[0]))  # y: (B, T, V)
    weights = batch.weights.flatten()
    if batch.targets.is_floating_point():
        squared = ((y - batch.targets) ** 2).mean(dim=-1).flatten()  # (B*T,)
        loss = (squared * weights).sum() / weights.sum()
        return loss, r_squared(y.detach()[batch.scored], batch.targets[batch.scored])
    ce = functional.cross_entropy(y.flatten(0, 1), batch.targets.flatten(), reduction="none")  # (B*T,)
    loss = (ce * weights).sum() / weights.sum()
    hits = (y.detach().argmax(dim=-1) == batch.targets)[batch.scored]
    return loss, float(hits.float().mean())


def r_squared(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """1 - residual / total sum of squares over every value of `actual` [N, K]."""
    total = float(((actual - actual.mean(dim=0)) ** 2).sum())
    residual = float(((predicted - actual) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float(residual == 0)


def train_step(
    model: SequenceModel, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip_norm: float
) -> tuple[float, float]:
    """One optimiser step with gradient-norm clipping; returns (loss, accuracy) before the step."""
    model.train()
    loss, accuracy = loss_and_accuracy(model, batch)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)  # the typed spelling of loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    return loss.item(), accuracy


@torch.no_grad()
def validate(model: SequenceModel, batches: Sequence[Batch]) -> tuple[float, float]:
    """Mean loss and accuracy over fixed validation batches."""
    model.eval()
    results = [loss_and_accuracy(model, batch) for batch in batches]
    return float(np.mean([loss.item() for loss, _ in results])), float(np.mean([acc for _, acc in results]))


def _set_learning_rate(optimizer: torch.optim.Optimizer, options: FitOptions, step: int) -> None:
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / options.max_steps))  # 1 -> 0
    scale = options.final_lr_fraction + (1.0 - options.final_lr_fraction) * cosine
    for group in optimizer.param_groups:
        group["lr"] = options.learning_rate * scale


def _advance_curriculum(state: _State, options: FitOptions, step: int) -> None:
    window = options.curriculum_window_steps
    if (
        step % window == 0
        and np.mean(state.history["train_acc"][-window:]) >= options.curriculum_advance_accuracy
    ):
        state.difficulty = min(1.0, state.difficulty + options.curriculum_increment)


def _should_stop(
    state: _State, model: SequenceModel, step: int, val_loss: float, options: FitOptions
) -> bool:
    """Keep the best weights so far; stop after `patience_evals` validations without improvement.

    Validation is at full difficulty, so it can stall while the curriculum is still easier: patience only
    counts once the curriculum is complete.
    """
    if val_loss < state.best_loss - options.min_loss_improvement:
        state.best_loss, state.best_step, state.stale_evals = val_loss, step, 0
        state.best_weights = copy.deepcopy(model.state_dict())
        return False
    if state.difficulty >= 1.0:
        state.stale_evals += 1
    return options.patience_evals is not None and state.stale_evals >= options.patience_evals


def _record(history: dict[str, list[float]], **values: float) -> None:
    for name, value in values.items():
        history[name].append(round(value, 5))


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch's generator and fix the thread count: on CPU, the same seed then gives the same weights."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def data_rng(seed: int, purpose: int) -> np.random.Generator:
    """An independent generator per purpose (training data, validation, evaluation) for one seed."""
    return np.random.default_rng([seed, purpose])
