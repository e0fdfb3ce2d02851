"""The demo's two language models, trained and exported when missing: the LSTM with the task's defaults, and
a plain RNN trained at short gaps only (it learns the task there: what it loses later is the gap's doing).
Imports training and export only when a model must be made: the serving image has neither."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

# The demo's RNN: the gap sweep's (1 x 93, as many parameters as the demo's LSTM) with the learning rate and
# clipping its per-cell search chose (reports/gap_sweep), trained at gaps of 0-4 words, where a plain RNN
# carries the country (0.95-1.00 there), in about 40 s of one core.
RNN_HIDDEN = 93
RNN_MAX_GAP_WORDS = 4
RNN_LEARNING_RATE = 0.01
RNN_GRAD_CLIP = 0.25
RNN_MAX_STEPS = 2500
# ONNX Runtime's tanh is a polynomial approximation; a plain RNN feeds every step's rounding into the next, so
# over a 50-word sentence its outputs drift from PyTorch's by up to ~2e-5 (scaled), past the 1e-5 our LSTMs
# keep. The RNN is exported at 5e-5, recorded in its card; chunked runs still equal whole runs exactly.
RNN_EXPORT_TOLERANCE = 5e-5


class DemoModelError(Exception):
    """A model could not be made; the message says why."""


@dataclass(frozen=True)
class ModelRecipe:
    """How to make one of the demo's models."""

    cell: Literal["lstm", "rnn"]
    hidden_size: int | None = None  # None: the task's
    max_gap_words: int | None = None  # None: the task's
    learning_rate: float | None = None  # None: the training default
    grad_clip: float | None = None
    max_steps: int | None = None
    export_tolerance: float | None = None  # None: the export's default (1e-5)


LSTM_RECIPE = ModelRecipe("lstm")
RNN_RECIPE = ModelRecipe(
    "rnn",
    RNN_HIDDEN,
    RNN_MAX_GAP_WORDS,
    RNN_LEARNING_RATE,
    RNN_GRAD_CLIP,
    RNN_MAX_STEPS,
    RNN_EXPORT_TOLERANCE,
)


def ensure_model(directory: Path, recipe: ModelRecipe, out: TextIO, max_steps: int | None = None) -> None:
    """Train and export `recipe`'s language model into `directory` unless its model.onnx is there already;
    `max_steps` overrides the recipe's (tests pass a few)."""
    if (directory / "model.onnx").is_file():
        return
    print(f"no model at {directory}: training and exporting one first ({recipe.cell})", file=out)
    try:
        from export import ExportError, export_artifact
        from training.loop import FitOptions
        from training.train import TrainOptions, train
    except ImportError as exc:
        raise DemoModelError(f"training needs the train extra (pip install -e '.[train]'): {exc}") from None
    defaults = FitOptions()
    fit = FitOptions(
        max_steps=max_steps or recipe.max_steps or defaults.max_steps,
        learning_rate=recipe.learning_rate or defaults.learning_rate,
        grad_clip_norm=recipe.grad_clip or defaults.grad_clip_norm,
    )
    options = TrainOptions(
        cell=recipe.cell,
        hidden_size=recipe.hidden_size,
        max_gap_words=recipe.max_gap_words,
        fit=fit,
    )
    try:
        train("language", directory, options)
        if recipe.export_tolerance is None:
            export_artifact(directory)
        else:
            export_artifact(directory, tolerance=recipe.export_tolerance)
    except (ExportError, OSError) as exc:
        raise DemoModelError(f"cannot make the {recipe.cell} language model: {exc}") from None
