"""Figures: training curves and the gap-sweep plot (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Figure without pyplot: no global backend or figure registry, so nothing needs a display or closing.
from matplotlib.figure import Figure


def plot_curves(history: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    """Loss and accuracy against step: training (smoothed) and validation."""
    fig = Figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(history["step"], _smooth(history[f"train_{metric}"]), label="train (smoothed)", alpha=0.8)
        ax.plot(history["val_step"], history[f"val_{metric}"], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if metric == "acc" else "weighted cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_sweep(
    gaps: Sequence[int],
    accuracy: Mapping[str, np.ndarray],
    path: Path,
    title: str,
    chance: float | None = None,
) -> None:
    """Accuracy against gap length (log), one line per cell (mean over seeds), the band from min to max seed.

    `accuracy[cell]` is (seeds, gaps); `chance`, when given, is drawn as a dashed line.
    """
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    # Wider lines and markers first: cells that score the same stay visible one under the other.
    cells = list(accuracy)
    for index, cell in enumerate(cells):
        values, width = accuracy[cell], 1.5 * 2 ** (len(cells) - 1 - index)
        (line,) = ax.plot(gaps, values.mean(axis=0), "o-", label=cell, linewidth=width, markersize=2 + width)
        ax.fill_between(gaps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(list(gaps), labels=[str(g) for g in gaps], minor=False, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("gap length G (filler words)")
    ax.set_ylabel("language-word accuracy (band: seeds' min-max)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")  # the corner no curve reaches: short gaps are learnt by every cell
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: Sequence[float], window: int = 25) -> np.ndarray:
    """Trailing moving average; the first points average what there is."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    end = np.arange(1, len(cumulative))
    start = np.maximum(0, end - window)
    smoothed: np.ndarray = (cumulative[end] - cumulative[start]) / (end - start)
    return smoothed
