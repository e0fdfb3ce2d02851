"""The gap sweep on a micro grid: files, shapes, and matched parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.experiment import SweepOptions, matched_configs, run_gap_sweep
from training.model import SequenceModel, count_parameters
from training.tasks.language import LanguageTask

pytestmark = pytest.mark.timeout(120)

_MICRO = SweepOptions(
    gaps_words=(2, 6),
    seeds=(0, 1),
    lstm_hidden_size=8,
    steps=6,
    batch_size=4,
    test_sentences=8,
    show_progress=False,
)


def test_micro_sweep_writes_the_report(tmp_path: Path) -> None:
    result = run_gap_sweep(tmp_path, _MICRO)
    assert {p.name for p in tmp_path.iterdir()} == {"table.md", "results.json", "plot.png"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    for cell in ("lstm", "gru", "rnn"):
        assert set(results["accuracy"][cell]) == {"2", "6"}
        assert all(
            len(seeds) == 2 and all(0 <= a <= 1 for a in seeds)
            for seeds in results["accuracy"][cell].values()
        )
        assert results["models"][cell]["parameters"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table == result.table_markdown
    assert "| 2 |" in table and "| 6 |" in table


def test_quick_grid_is_smaller_than_the_full_one() -> None:
    quick, full = SweepOptions.quick(), SweepOptions()
    assert len(quick.gaps_words) * quick.steps < len(full.gaps_words) * full.steps
    assert len(full.seeds) >= 3 and len(full.cells) == 3


def test_cells_have_matched_parameter_counts() -> None:
    configs = matched_configs(LanguageTask().default_model_config(), SweepOptions())
    counts = {cell: count_parameters(SequenceModel(config)) for cell, config in configs.items()}
    assert configs["lstm"].hidden_size == 64
    assert configs["rnn"].hidden_size > configs["gru"].hidden_size > configs["lstm"].hidden_size
    assert max(counts.values()) / min(counts.values()) < 1.03
