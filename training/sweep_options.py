"""What a gap sweep is asked to do (`SweepOptions`) and what its search tries (`Setting`, `Trial`): shared by
the sweep (`training.experiment`) and its report (`training.sweep_report`)."""

from __future__ import annotations

from dataclasses import dataclass

from training.model import CellKind


@dataclass(frozen=True)
class Setting:
    """A learning rate and a gradient-clipping norm: what the search picks per cell."""

    learning_rate: float
    grad_clip_norm: float


@dataclass(frozen=True)
class SweepOptions:
    """The grid, the search, and the per-run budget (identical for every cell)."""

    # Dense where the plain RNN falls (8-20 words), sparse where the gated cells only might.
    gaps_words: tuple[int, ...] = (1, 2, 3, 5, 8, 10, 12, 15, 20, 50, 100, 200, 400)
    cells: tuple[CellKind, ...] = ("lstm", "gru", "rnn")
    seeds: tuple[int, ...] = (0, 1, 2)
    lstm_hidden_size: int = 64  # the other cells get the hidden size that matches its parameter count
    steps: int = 1000
    batch_size: int = 32
    gap_jitter_fraction: float = 0.2
    lead_words_max: int = 10
    # Few, short curriculum stages: at ten stages of at least 50 steps, a quick run spent nearly its whole
    # budget getting to G, and measured the speed of learning instead of the reach.
    curriculum_stages: int = 4
    curriculum_window_steps: int = 25
    search_learning_rates: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    search_grad_clip_norms: tuple[float, ...] = (0.25, 1.0)
    search_gap_words: int = 5
    search_seed: int = 100  # not one of the sweep's seeds: the search never sees the runs it sets up
    validation_sentences: int = 300
    test_sentences: int = 300
    threads: int = 1  # see TrainOptions.threads
    show_progress: bool = True

    @classmethod
    def quick(cls) -> SweepOptions:
        """A reduced grid and search that run in a few minutes on one core."""
        return cls(
            gaps_words=(1, 5, 10, 20, 50),
            seeds=(0,),
            steps=600,
            search_learning_rates=(3e-3, 1e-2),
            search_grad_clip_norms=(1.0,),
            validation_sentences=200,
            test_sentences=200,
        )


@dataclass(frozen=True)
class Trial:
    """One setting of the search and how it validated."""

    setting: Setting
    val_accuracy: float
    val_loss: float
