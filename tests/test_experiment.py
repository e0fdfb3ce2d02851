"""The gap sweep on a micro grid: files, shapes, the per-cell search, collapse points, matched parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.experiment import best_trial, collapse_points, matched_configs, run_gap_sweep
from training.model import SequenceModel, count_parameters
from training.sweep_options import Setting, SweepOptions, Trial
from training.sweep_report import AT_CHANCE
from training.tasks.language import LanguageTask

pytestmark = pytest.mark.timeout(120)

_MICRO = SweepOptions(
    gaps_words=(1, 6),
    seeds=(0, 1),
    lstm_hidden_size=8,
    steps=6,
    batch_size=4,
    lead_words_max=3,
    search_learning_rates=(1e-2, 3e-3),
    search_grad_clip_norms=(1.0,),
    search_gap_words=2,
    validation_sentences=8,
    test_sentences=8,
    show_progress=False,
)


def test_micro_sweep_writes_the_report(tmp_path: Path) -> None:
    result = run_gap_sweep(tmp_path, _MICRO)
    assert {p.name for p in tmp_path.iterdir()} == {"table.md", "results.json", "plot.png"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    for cell in ("lstm", "gru", "rnn"):
        assert set(results["accuracy"][cell]) == {"1", "6"}
        assert all(
            len(seeds) == 2 and all(0 <= a <= 1 for a in seeds)
            for seeds in results["accuracy"][cell].values()
        )
        assert results["models"][cell]["parameters"] > 0
        assert [t["setting"]["learning_rate"] for t in results["search"][cell]] == [1e-2, 3e-3]
        assert results["chosen"][cell] == {
            "learning_rate": result.chosen[cell].learning_rate,
            "grad_clip_norm": 1.0,
        }
        assert set(results["collapse"][cell]) == {"below_half", "at_chance"}
    table = (tmp_path / "table.md").read_text()
    assert table == result.table_markdown
    assert "| 1 |" in table and "| 6 |" in table
    assert "lr 0.01, clip 1 | lr 0.003, clip 1 | chosen |" in table


def test_the_search_keeps_the_best_accuracy_then_the_lowest_loss() -> None:
    trials = [
        Trial(Setting(3e-3, 1.0), 0.9, 0.1),
        Trial(Setting(1e-2, 1.0), 1.0, 0.02),
        Trial(Setting(1e-2, 0.25), 1.0, 0.01),
    ]
    assert best_trial(trials).setting == Setting(1e-2, 0.25)


def test_collapse_points() -> None:
    gaps = (1, 5, 10, 20, 50)
    assert collapse_points(gaps, np.array([1.0, 0.9, 0.4, 0.04, 0.03])) == {"below_half": 10, "at_chance": 20}
    assert collapse_points(gaps, np.array([1.0, 1.0, 0.6, 0.5, 0.49])) == {
        "below_half": 50,
        "at_chance": None,
    }
    assert collapse_points(gaps, np.ones(5)) == {"below_half": None, "at_chance": None}
    assert AT_CHANCE == 2 / 40


def test_quick_grid_is_smaller_than_the_full_one() -> None:
    quick, full = SweepOptions.quick(), SweepOptions()
    assert len(quick.gaps_words) * quick.steps < len(full.gaps_words) * full.steps
    assert len(full.seeds) >= 3 and len(full.cells) == 3
    assert full.gaps_words[0] == 1 and list(full.gaps_words) == sorted(full.gaps_words)
    assert len(full.search_learning_rates) * len(full.search_grad_clip_norms) >= 6


def test_cells_have_matched_parameter_counts() -> None:
    configs = matched_configs(LanguageTask().default_model_config(), SweepOptions())
    counts = {cell: count_parameters(SequenceModel(config)) for cell, config in configs.items()}
    assert configs["lstm"].hidden_size == 64
    assert configs["rnn"].hidden_size > configs["gru"].hidden_size > configs["lstm"].hidden_size
    assert max(counts.values()) / min(counts.values()) < 1.03
