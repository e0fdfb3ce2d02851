"""`conveyor experiment gap-sweep`: language-word accuracy against gap length for LSTM, GRU and plain RNN.

For each gap G, each cell is trained from scratch under the same budget (steps, batch size, schedule, loss
weights, the training loop of `conveyor train`) on single sentences with gaps within ±20% of a target that
the loop's curriculum moves from a few words up to G as each stage is learnt, with hidden sizes chosen so that
all cells have about the same number of parameters. Each is then tested on held-out sentences whose gap is
exactly G. The curriculum is the same for every cell: without one, even the LSTM sat at chance for the whole
budget at G = 20 (a first quick run), which measures the budget, not the cell. Whatever the figures show is
the result; nothing here is tuned per cell.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.loop import FitOptions, data_rng, fit, seed_everything
from training.model import CellKind, ModelConfig, SequenceModel, count_parameters
from training.plots import plot_sweep
from training.tasks.base import Batch, scored_accuracy
from training.tasks.language import LanguageTask

_TRAIN_DATA, _VALIDATION_DATA, _TEST_DATA = 0, 1, 2
_FIRST_STAGE_GAP_WORDS = 5


@dataclass(frozen=True)
class SweepOptions:
    """The grid and the per-run budget (identical for every cell)."""

    gaps_words: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 400)
    cells: tuple[CellKind, ...] = ("lstm", "gru", "rnn")
    seeds: tuple[int, ...] = (0, 1, 2)
    lstm_hidden_size: int = 64  # the other cells get the hidden size that matches its parameter count
    steps: int = 1000
    batch_size: int = 32
    gap_jitter_fraction: float = 0.2
    # Fewer, shorter curriculum stages than `conveyor train`: at ten stages of at least 50 steps, a quick run
    # spent nearly its whole budget getting to G, and measured the speed of learning instead of the reach.
    curriculum_stages: int = 4
    curriculum_window_steps: int = 25
    test_sentences: int = 300
    threads: int = 1  # see TrainOptions.threads
    show_progress: bool = True

    @classmethod
    def quick(cls) -> SweepOptions:
        """A reduced grid that runs in a few minutes on two cores."""
        return cls(gaps_words=(5, 20, 60), steps=600, test_sentences=200)


@dataclass(frozen=True)
class SweepResult:
    """Where the report went, and the table it contains."""

    out_dir: Path
    table_markdown: str
    elapsed_s: float
    accuracy: dict[str, list[list[float]]]  # cell -> [seed][gap]


class _GapSource:
    """Sentences with gaps within ±jitter of a target that grows with the curriculum to one gap length."""

    def __init__(self, task: LanguageTask, gap: int, jitter: float) -> None:
        self.task = task
        self.gap = gap
        self.first_gap = min(gap, _FIRST_STAGE_GAP_WORDS)
        self.jitter = jitter

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        target = self.first_gap + difficulty * (self.gap - self.first_gap)
        low, high = max(0, round(target * (1 - self.jitter))), round(target * (1 + self.jitter))
        return self.task.gap_batch(rng.integers(low, high, size=batch_size, endpoint=True).tolist(), rng)

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        return self.training_batch(batch_size, 1.0, rng)


def run_gap_sweep(out_dir: Path, options: SweepOptions | None = None) -> SweepResult:
    """Run the sweep and write table.md, results.json and plot.png into `out_dir`."""
    options = options or SweepOptions()
    task = LanguageTask()
    configs = matched_configs(task.default_model_config(), options)
    started = time.perf_counter()
    runs = [
        (gap, cell, seed) for gap in options.gaps_words for cell in options.cells for seed in options.seeds
    ]
    total_work = sum(_work(gap) for gap, _, _ in runs)
    done_work = 0.0
    accuracy: dict[str, np.ndarray] = {
        c: np.zeros((len(options.seeds), len(options.gaps_words))) for c in options.cells
    }
    for index, (gap, cell, seed) in enumerate(runs, start=1):
        acc = _run_one(task, configs[cell], gap, seed, options)
        accuracy[cell][options.seeds.index(seed), options.gaps_words.index(gap)] = acc
        done_work += _work(gap)
        _report_progress(options, index, len(runs), (gap, cell, seed, acc), started, done_work / total_work)
    elapsed_s = time.perf_counter() - started
    table = _table(options, configs, accuracy, elapsed_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(
        json.dumps(_results(options, configs, accuracy, elapsed_s), indent=2) + "\n"
    )
    plot_sweep(
        list(options.gaps_words), accuracy, out_dir / "plot.png", "language word after a gap of G words"
    )
    return SweepResult(
        out_dir, table, elapsed_s, {cell: values.tolist() for cell, values in accuracy.items()}
    )


def matched_configs(base: ModelConfig, options: SweepOptions) -> dict[CellKind, ModelConfig]:
    """One config per cell: the LSTM at `lstm_hidden_size`, the others at the closest parameter count."""
    target = count_parameters(SequenceModel(replace(base, cell="lstm", hidden_size=options.lstm_hidden_size)))
    return {cell: _closest_config(replace(base, cell=cell), target) for cell in options.cells}


def _closest_config(base: ModelConfig, target_parameters: int) -> ModelConfig:
    """The hidden size whose parameter count is closest to the target (the count grows with the size)."""
    hidden = 1
    while _parameters(replace(base, hidden_size=hidden + 1)) < target_parameters:
        hidden += 1
    candidates = [replace(base, hidden_size=h) for h in (hidden, hidden + 1)]
    return min(candidates, key=lambda c: abs(_parameters(c) - target_parameters))


def _run_one(task: LanguageTask, config: ModelConfig, gap: int, seed: int, options: SweepOptions) -> float:
    seed_everything(seed, options.threads)
    model = SequenceModel(config)
    fit_options = FitOptions(
        max_steps=options.steps,
        batch_size=options.batch_size,
        curriculum_window_steps=options.curriculum_window_steps,
        curriculum_increment=1.0 / options.curriculum_stages,
        patience_evals=None,  # the same budget for every run
    )
    source = _GapSource(task, gap, options.gap_jitter_fraction)
    fit(source, model, fit_options, (data_rng(seed, _TRAIN_DATA), data_rng(seed, _VALIDATION_DATA)))
    return scored_accuracy(model, task.gap_batch([gap] * options.test_sentences, data_rng(seed, _TEST_DATA)))


def _work(gap: int) -> float:
    """Relative cost of one run: proportional to the sentence length (11 frame words around the gap)."""
    return gap + 11.0


def _report_progress(
    options: SweepOptions,
    index: int,
    total: int,
    run: tuple[int, str, int, float],
    started: float,
    done: float,
) -> None:
    if not options.show_progress:
        return
    gap, cell, seed, acc = run
    elapsed = time.perf_counter() - started
    remaining = elapsed / done * (1.0 - done)
    print(f"[{index}/{total}] gap {gap} {cell} seed {seed}: accuracy {acc:.3f}  ", end="")
    print(f"elapsed {elapsed / 60:.1f} min, about {remaining / 60:.1f} min left", flush=True)


def _parameters(config: ModelConfig) -> int:
    return count_parameters(SequenceModel(config))


def _table(
    options: SweepOptions,
    configs: dict[CellKind, ModelConfig],
    accuracy: dict[str, np.ndarray],
    elapsed_s: float,
) -> str:
    cells = options.cells
    lines = [
        "# Gap sweep: language-word accuracy at gap G (mean over seeds, min-max in brackets)",
        "",
        ", ".join(
            f"{c}: hidden {configs[c].hidden_size}, {_parameters(configs[c])} parameters" for c in cells
        )
        + f". {options.steps} steps of {options.batch_size} sentences per run, seeds {list(options.seeds)}, "
        + f"{options.test_sentences} test sentences per point; {elapsed_s / 60:.1f} min in all.",
        "",
        "| G | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for j, gap in enumerate(options.gaps_words):
        cols = [_cell_text(accuracy[c][:, j]) for c in cells]
        lines.append(f"| {gap} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ({values.min():.2f}-{values.max():.2f})"


def _results(
    options: SweepOptions,
    configs: dict[CellKind, ModelConfig],
    accuracy: dict[str, np.ndarray],
    elapsed_s: float,
) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "models": {c: {**asdict(configs[c]), "parameters": _parameters(configs[c])} for c in options.cells},
        "accuracy": {
            c: {str(g): accuracy[c][:, j].tolist() for j, g in enumerate(options.gaps_words)}
            for c in options.cells
        },
        "elapsed_s": round(elapsed_s, 1),
    }
