"""`conveyor experiment gap-sweep`: language-word accuracy against gap length for LSTM, GRU and plain RNN.

Each cell first gets its own learning rate and gradient clipping: a small search (every pair of
`search_learning_rates` x `search_grad_clip_norms`, one seed, at a short gap, the sweep's own budget) keeps
the pair with the best validation accuracy (then language-word loss). Then, for each gap G, each cell trains
from scratch with its pair under the same budget (steps, batch size, schedule, loss weights, the training
loop of `conveyor train`), with hidden sizes chosen so that all cells have about the same number of
parameters, and is tested on held-out sentences whose gap is exactly G.

Training sentences have gaps within ±20% of a target that the loop's curriculum moves from 0 up to G,
geometrically, as each stage is learnt. Each sentence follows a random lead of 0 to `lead_words_max` filler
words, so the question never sits at a fixed time step. Three things that handicapped the plain RNN in the
first version of this sweep (first quick runs, one seed each):
- a first curriculum stage at 5 words, that is no curriculum at all at G <= 5: the RNN stayed near chance
  (0.03-0.16 at G = 5 for each of 3 learning rates x 2 clippings); from gap 0, 0.98-1.00 (lr 1e-2);
- the question always at the same time step (sentences were only padded to the batch's longest): the RNN
  read the answer off the clock (0.58 at that step, 0.04-0.07 one step earlier or later);
- a linear curriculum from 0: its first step (0 to G/4) was too big for the LSTM at G = 400 (0.28); the
  geometric one goes 0, 3.5, 19, 88, 400 there.
The jitter stays: without it the RNN learns a delay line of exactly G words (0.997 at G = 12, 0.02 at G = 8
from the same model), which is not a memory of the country.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from training.loop import FitOptions, data_rng, fit, seed_everything
from training.model import CellKind, ModelConfig, SequenceModel, count_parameters
from training.plots import plot_sweep
from training.sweep_options import Setting, SweepOptions, Trial
from training.sweep_report import AT_CHANCE, CHANCE, SweepReport
from training.tasks.base import Batch
from training.tasks.language import LanguageTask, Stream
from training.tasks.words import FILLER_WORDS

_TRAIN_DATA, _VALIDATION_DATA, _TEST_DATA = 0, 1, 2


@dataclass(frozen=True)
class SweepResult:
    """Where the report went, and the table it contains."""

    out_dir: Path
    table_markdown: str
    elapsed_s: float
    accuracy: dict[str, list[list[float]]]  # cell -> [seed][gap]
    chosen: dict[str, Setting]
    collapse: dict[str, dict[str, int | None]]  # cell -> {"below_half": G, "at_chance": G}


class _GapSource:
    """Single sentences after a random lead, gaps within ±jitter of a target the curriculum moves to G."""

    def __init__(self, task: LanguageTask, gap: int, options: SweepOptions) -> None:
        self.task = task
        self.gap = gap
        self.jitter = options.gap_jitter_fraction
        self.lead_words_max = options.lead_words_max
        self.filler = np.array(task.encode(" ".join(FILLER_WORDS)), dtype=np.int64)

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        target = (self.gap + 1) ** difficulty - 1  # geometric, 0 -> G
        low, high = max(0, round(target * (1 - self.jitter))), round(target * (1 + self.jitter))
        return self.sentences(rng.integers(low, high, size=batch_size, endpoint=True).tolist(), rng)

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        return self.training_batch(batch_size, 1.0, rng)

    def sentences(self, gaps: list[int], rng: np.random.Generator) -> Batch:
        """One sentence per gap length, each after 0 to `lead_words_max` filler words."""
        streams = []
        for gap in gaps:
            sentence = self.task.stream([gap], rng)
            lead = rng.choice(self.filler, size=int(rng.integers(0, self.lead_words_max, endpoint=True)))
            positions = [len(lead) + p for p in sentence.language_positions]
            streams.append(Stream(lead.tolist() + sentence.ids, positions))
        return self.task.batch(streams, rng)


def run_gap_sweep(out_dir: Path, options: SweepOptions | None = None) -> SweepResult:
    """Run the search and the sweep; write table.md, results.json and plot.png into `out_dir`."""
    options = options or SweepOptions()
    task = LanguageTask()
    configs = matched_configs(task.default_model_config(), options)
    started, cpu_started = time.perf_counter(), time.process_time()
    trials: dict[str, list[Trial]] = {
        cell: search_setting(task, configs[cell], options) for cell in options.cells
    }
    chosen: dict[str, Setting] = {cell: best_trial(trials[cell]).setting for cell in options.cells}
    search_s = time.perf_counter() - started
    accuracy = _sweep(task, configs, chosen, options)
    elapsed_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    collapse: dict[str, dict[str, int | None]] = {
        cell: collapse_points(options.gaps_words, accuracy[cell].mean(axis=0)) for cell in options.cells
    }
    report = SweepReport(options, configs, trials, chosen, accuracy, collapse, search_s, elapsed_s, cpu_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.table()
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(report.results(), indent=2) + "\n")
    plot_sweep(
        list(options.gaps_words),
        accuracy,
        out_dir / "plot.png",
        "language word after a gap of G words",
        chance=CHANCE,
    )
    return SweepResult(
        out_dir,
        table,
        elapsed_s,
        {cell: values.tolist() for cell, values in accuracy.items()},
        chosen,
        collapse,
    )


def matched_configs(base: ModelConfig, options: SweepOptions) -> dict[CellKind, ModelConfig]:
    """One config per cell: the LSTM at `lstm_hidden_size`, the others at the closest parameter count."""
    target = count_parameters(SequenceModel(replace(base, cell="lstm", hidden_size=options.lstm_hidden_size)))
    return {cell: _closest_config(replace(base, cell=cell), target) for cell in options.cells}


def search_setting(task: LanguageTask, config: ModelConfig, options: SweepOptions) -> list[Trial]:
    """Every learning rate x clipping pair at `search_gap_words`, one seed, on held-out sentences."""
    gap, seed = options.search_gap_words, options.search_seed
    trials = []
    for learning_rate, clip in itertools.product(
        options.search_learning_rates, options.search_grad_clip_norms
    ):
        setting = Setting(learning_rate, clip)
        model = _train_one(task, config, gap, seed, setting, options)
        batch = _GapSource(task, gap, options).sentences(
            [gap] * options.validation_sentences, data_rng(seed, _VALIDATION_DATA)
        )
        loss, acc = language_word_loss_and_accuracy(model, batch)
        trials.append(Trial(setting, acc, loss))
        if options.show_progress:
            print(
                f"[search] {config.cell} lr {learning_rate:g} clip {clip:g} at gap {gap}: "
                f"validation accuracy {acc:.3f}, loss {loss:.4f}",
                flush=True,
            )
    return trials


def best_trial(trials: list[Trial]) -> Trial:
    """The highest validation accuracy; among equals (several at 1.000), the lowest language-word loss."""
    return max(trials, key=lambda t: (round(t.val_accuracy, 3), -t.val_loss))


@torch.no_grad()
def language_word_loss_and_accuracy(model: SequenceModel, batch: Batch) -> tuple[float, float]:
    """Cross-entropy and accuracy at the language word alone.

    The training loss also holds every other position, mostly the filler's irreducible entropy: a poor
    tie-break between settings that all remember the country.
    """
    y, _ = model(batch.x, model.init_state(batch.x.shape[0]))  # y: (B, T, V)
    logits, targets = y[batch.scored], batch.targets[batch.scored]  # (N, V), (N,)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return functional.cross_entropy(logits, targets).item(), accuracy.item()


def collapse_points(gaps: tuple[int, ...], mean_accuracy: np.ndarray) -> dict[str, int | None]:
    """The first gap whose mean accuracy is below 0.5, and the first below twice chance (None: never)."""

    def first(limit: float) -> int | None:
        return next((g for g, a in zip(gaps, mean_accuracy, strict=True) if a < limit), None)

    return {"below_half": first(0.5), "at_chance": first(AT_CHANCE)}


def _sweep(
    task: LanguageTask,
    configs: dict[CellKind, ModelConfig],
    chosen: dict[str, Setting],
    options: SweepOptions,
) -> dict[str, np.ndarray]:
    """Accuracy at exactly G per cell, (seeds, gaps)."""
    runs = [
        (gap, cell, seed) for gap in options.gaps_words for cell in options.cells for seed in options.seeds
    ]
    total_work = sum(_work(gap, options) for gap, _, _ in runs)
    done_work, started = 0.0, time.perf_counter()
    accuracy: dict[str, np.ndarray] = {
        c: np.zeros((len(options.seeds), len(options.gaps_words))) for c in options.cells
    }
    for index, (gap, cell, seed) in enumerate(runs, start=1):
        model = _train_one(task, configs[cell], gap, seed, chosen[cell], options)
        test = _GapSource(task, gap, options).sentences(
            [gap] * options.test_sentences, data_rng(seed, _TEST_DATA)
        )
        _, acc = language_word_loss_and_accuracy(model, test)
        accuracy[cell][options.seeds.index(seed), options.gaps_words.index(gap)] = acc
        done_work += _work(gap, options)
        _report_progress(options, index, len(runs), (gap, cell, seed, acc), started, done_work / total_work)
    return accuracy


def _train_one(
    task: LanguageTask, config: ModelConfig, gap: int, seed: int, setting: Setting, options: SweepOptions
) -> SequenceModel:
    seed_everything(seed, options.threads)
    model = SequenceModel(config)
    fit_options = FitOptions(
        max_steps=options.steps,
        batch_size=options.batch_size,
        learning_rate=setting.learning_rate,
        grad_clip_norm=setting.grad_clip_norm,
        curriculum_window_steps=options.curriculum_window_steps,
        curriculum_increment=1.0 / options.curriculum_stages,
        patience_evals=None,  # the same budget for every run
    )
    source = _GapSource(task, gap, options)
    fit(source, model, fit_options, (data_rng(seed, _TRAIN_DATA), data_rng(seed, _VALIDATION_DATA)))
    return model


def _work(gap: int, options: SweepOptions) -> float:
    """Relative cost of one run: proportional to the sentence length (frame words, lead and gap)."""
    return gap + 11.0 + options.lead_words_max


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


def _closest_config(base: ModelConfig, target_parameters: int) -> ModelConfig:
    """The hidden size whose parameter count is closest to the target (the count grows with the size)."""
    hidden = 1
    while _parameters(replace(base, hidden_size=hidden + 1)) < target_parameters:
        hidden += 1
    candidates = [replace(base, hidden_size=h) for h in (hidden, hidden + 1)]
    return min(candidates, key=lambda c: abs(_parameters(c) - target_parameters))


def _parameters(config: ModelConfig) -> int:
    return count_parameters(SequenceModel(config))
