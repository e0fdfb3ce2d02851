"""`conveyor train`: train a task's model, validate, stop early, and write the artifact directory.

Writes checkpoint.pt (the best validation step), metrics.json, curves.png and train_config.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import save_checkpoint
from training.loop import FitOptions, FitResult, data_rng, fit, seed_everything
from training.model import CellKind, ModelConfig, SequenceModel, count_parameters
from training.plots import plot_curves
from training.tasks import Task, get_task
from training.tasks.language import LanguageTask

# Independent random streams per purpose, so that changing one (say, more validation) leaves the others.
TRAIN_DATA, VALIDATION_DATA, EVALUATION_DATA, EXPORT_SAMPLES, DATA_SPLIT = 0, 1, 2, 3, 4
SAMPLES_KEPT = 4  # real inputs kept in the checkpoint for export to verify the graph on


class TrainOptionError(ValueError):
    """An option that does not apply to the task; the message says which."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train; the task's default model unless `cell` or `hidden_size` override it."""

    seed: int = 0
    # One thread: on a small machine shared with other work, two OpenMP threads wait on each other and a step
    # takes many times longer (docs/benchmarks.md).
    threads: int = 1
    cell: CellKind | None = None
    hidden_size: int | None = None
    # The language task's longest training gap (default 200 words): a plain RNN learns the task only at short
    # gaps. None: the task's own.
    max_gap_words: int | None = None
    show_progress: bool = True  # tqdm bar and a closing summary on stdout
    fit: FitOptions = field(default_factory=FitOptions)


@dataclass(frozen=True)
class TrainResult:
    """Where the artifacts went and the figures worth printing."""

    out_dir: Path
    checkpoint_path: Path
    steps: int
    best_step: int
    wall_time_s: float
    headline_metric: str
    headline_value: float
    metrics: dict[str, Any]


def train(task_name: str, out_dir: Path, options: TrainOptions | None = None) -> TrainResult:
    """Train `task_name`'s model into `out_dir`.

    Raises UnknownTaskError for an unknown task, TrainOptionError for an option that is not the task's.
    """
    options = options or TrainOptions()
    return train_task(_task(task_name, options), out_dir, options)


def train_task(task: Task, out_dir: Path, options: TrainOptions) -> TrainResult:
    """Train `task`'s model (a generated task, or a file's: `training.tasks.data`) into `out_dir`."""
    config = _model_config(task, options)
    started = time.perf_counter()
    seed_everything(options.seed, options.threads)
    model = SequenceModel(config)
    rngs = (data_rng(options.seed, TRAIN_DATA), data_rng(options.seed, VALIDATION_DATA))
    fit_options = replace(options.fit, curriculum=task.curriculum)
    result = fit(task, model, fit_options, rngs, progress_label=task.name if options.show_progress else None)
    evaluation = task.evaluate(model, data_rng(options.seed, EVALUATION_DATA))
    wall_time_s = time.perf_counter() - started
    metrics = _metrics(task, model, result, evaluation, wall_time_s)
    samples = task.sample_sequences(SAMPLES_KEPT, data_rng(options.seed, EXPORT_SAMPLES))
    checkpoint_path = save_checkpoint(out_dir, model, config, task.info(), result.best_step, metrics, samples)
    _write_json(out_dir / "metrics.json", {**metrics, "history": result.history})
    _write_json(out_dir / "train_config.json", _train_config(task, config, options))
    plot_curves(
        result.history, out_dir / "curves.png", title=f"{task.name} ({config.cell}, {config.hidden_size})"
    )
    headline = task.headline_metric()
    if options.show_progress:
        print(
            f"trained {task.name} in {wall_time_s:.1f} s ({result.steps} steps, best at {result.best_step})"
        )
        print(f"{headline} = {evaluation[headline]:.4f}")
    return TrainResult(
        out_dir,
        checkpoint_path,
        result.steps,
        result.best_step,
        wall_time_s,
        headline,
        evaluation[headline],
        metrics,
    )


def _task(task_name: str, options: TrainOptions) -> Task:
    task = get_task(task_name)
    if options.max_gap_words is None:
        return task
    if not isinstance(task, LanguageTask):
        raise TrainOptionError(f"a maximum gap applies to the language task only, not to {task_name!r}")
    first = min(task.config.start_max_gap_words, options.max_gap_words)
    return LanguageTask(
        replace(task.config, start_max_gap_words=first, train_max_gap_words=options.max_gap_words)
    )


def _model_config(task: Task, options: TrainOptions) -> ModelConfig:
    config = task.default_model_config()
    if options.cell is not None:
        config = replace(config, cell=options.cell)
    if options.hidden_size is not None:
        config = replace(config, hidden_size=options.hidden_size)
    return config


def _metrics(
    task: Task, model: SequenceModel, result: FitResult, evaluation: dict[str, float], wall_time_s: float
) -> dict[str, Any]:
    """The figures that travel in the checkpoint (and on into the model card)."""
    headline = task.headline_metric()
    return {
        "task": task.name,
        "steps": result.steps,
        "best_step": result.best_step,
        "parameters": count_parameters(model),
        "validation_loss": result.best_val_loss,
        "wall_time_s": round(wall_time_s, 1),
        "headline_metric": headline,
        "headline_value": evaluation[headline],
        **evaluation,
        **_normalization(model.config),
    }


def _normalization(config: ModelConfig) -> dict[str, Any]:
    """The inputs' normalization built into the model, for the card to show (the graph applies it)."""
    if config.input_mean is None or config.input_scale is None:
        return {}
    return {"input_mean": list(config.input_mean), "input_scale": list(config.input_scale)}


def _train_config(task: Task, config: ModelConfig, options: TrainOptions) -> dict[str, Any]:
    task_config = getattr(task, "config", None)  # both tasks keep theirs in a frozen dataclass
    return {
        "task": task.name,
        "task_config": asdict(task_config) if task_config is not None else None,
        "model": asdict(config),
        "options": asdict(options),
        "torch_version": torch.__version__,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
