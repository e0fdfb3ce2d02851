"""The gap sweep's report: the table (with the collapse points and the search) and results.json."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from training.model import CellKind, ModelConfig, SequenceModel, count_parameters
from training.sweep_options import Setting, SweepOptions, Trial
from training.tasks.language import LANGUAGES

CHANCE = 1.0 / len(LANGUAGES)  # a uniform guess among the 40 languages
AT_CHANCE = 2.0 * CHANCE  # "at chance": a mean accuracy below twice that


@dataclass(frozen=True)
class SweepReport:
    """One sweep's figures, and their table.md and results.json."""

    options: SweepOptions
    configs: dict[CellKind, ModelConfig]
    trials: dict[str, list[Trial]]  # cell -> the search's settings in grid order
    chosen: dict[str, Setting]
    accuracy: dict[str, np.ndarray]  # cell -> (seeds, gaps)
    collapse: dict[str, dict[str, int | None]]  # cell -> {"below_half": G, "at_chance": G}
    search_s: float  # wall
    elapsed_s: float  # wall, the search included
    cpu_s: float  # this process's CPU time

    def table(self) -> str:
        o, cells = self.options, self.options.cells
        lines = [
            "# Gap sweep: language-word accuracy at gap G (mean over seeds, min-max in brackets)",
            "",
            f"{o.steps} steps of {o.batch_size} sentences per run for every cell, seeds {list(o.seeds)}, "
            f"{o.test_sentences} test sentences per point; {self.elapsed_s / 60:.1f} min in all "
            f"({self.search_s / 60:.1f} of them the search below), {self.cpu_s / 60:.1f} min of CPU.",
            "",
            "| cell | hidden | parameters | learning rate | clipping |",
            "|---|---|---|---|---|",
            *(
                f"| {c} | {self.configs[c].hidden_size} | {_parameters(self.configs[c])} "
                f"| {self.chosen[c].learning_rate:g} | {self.chosen[c].grad_clip_norm:g} |"
                for c in cells
            ),
            "",
            "| G | " + " | ".join(cells) + " |",
            "|---|" + "---|" * len(cells),
        ]
        for j, gap in enumerate(o.gaps_words):
            lines.append(f"| {gap} | " + " | ".join(_cell_text(self.accuracy[c][:, j]) for c in cells) + " |")
        lines += [
            "",
            f"Chance is 1/{len(LANGUAGES)} = {CHANCE:.3f}; at chance: a mean below {AT_CHANCE:.2f}.",
            "",
        ]
        lines += [f"- {c}: {self._collapse_text(c)}" for c in cells]
        return "\n".join([*lines, "", *self._search_table()]) + "\n"

    def _collapse_text(self, cell: str) -> str:
        gaps, means = self.options.gaps_words, self.accuracy[cell].mean(axis=0)
        below, chance = self.collapse[cell]["below_half"], self.collapse[cell]["at_chance"]
        if below is None:
            lowest = int(means.argmin())
            return f"at or above 50% across the grid (lowest mean {means[lowest]:.3f}, at G = {gaps[lowest]})"
        j = gaps.index(below)
        before = f"; {means[j - 1]:.3f} at G = {gaps[j - 1]}" if j > 0 else ""
        text = f"below 50% from G = {below} ({means[j]:.3f}{before})"
        return text + (
            f"; at chance from G = {chance}" if chance is not None else "; not at chance in the grid"
        )

    def _search_table(self) -> list[str]:
        o = self.options
        pairs = list(itertools.product(o.search_learning_rates, o.search_grad_clip_norms))
        lines = [
            f"## Per-cell learning rate and clipping: validation accuracy at G = {o.search_gap_words} "
            f"(seed {o.search_seed}, {o.validation_sentences} sentences, the same budget)",
            "",
            "| cell | " + " | ".join(f"lr {lr:g}, clip {clip:g}" for lr, clip in pairs) + " | chosen |",
            "|---|" + "---|" * (len(pairs) + 1),
        ]
        for cell in o.cells:
            chosen = self.chosen[cell]
            lines.append(
                f"| {cell} | "
                + " | ".join(f"{t.val_accuracy:.3f}" for t in self.trials[cell])
                + f" | lr {chosen.learning_rate:g}, clip {chosen.grad_clip_norm:g} |"
            )
        return lines

    def results(self) -> dict[str, Any]:
        o = self.options
        return {
            "options": asdict(o),
            "models": {
                c: {**asdict(self.configs[c]), "parameters": _parameters(self.configs[c])} for c in o.cells
            },
            "search": {c: [asdict(t) for t in self.trials[c]] for c in o.cells},
            "chosen": {c: asdict(self.chosen[c]) for c in o.cells},
            "accuracy": {
                c: {str(g): self.accuracy[c][:, j].tolist() for j, g in enumerate(o.gaps_words)}
                for c in o.cells
            },
            "chance": CHANCE,
            "at_chance_below": AT_CHANCE,
            "collapse": self.collapse,
            "search_s": round(self.search_s, 1),
            "elapsed_s": round(self.elapsed_s, 1),
            "cpu_s": round(self.cpu_s, 1),
        }


def _cell_text(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ({values.min():.2f}-{values.max():.2f})"


def _parameters(config: ModelConfig) -> int:
    return count_parameters(SequenceModel(config))
