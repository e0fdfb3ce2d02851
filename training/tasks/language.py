"""The long-dependency language task from the LSTM notes, at word level.

    i grew up in france . <filler of G words> i speak fluent french .

The model is a next-word language model over the whole vocabulary, trained at every position, but the
position that predicts the language word (input "fluent") carries most of the loss weight: a feasibility run
saw an unweighted all-positions loss degrade beyond the training gaps, while a loss focused on the language
word extrapolated. Word level rather than character level because the dependency is between words: characters
would multiply every gap by about six, and the training time with it. Training rows hold several sentences
back to back, each with a different country from the one before, so the memory must be overwritten, not
accumulated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.checkpoint import TaskInfo
from training.model import ModelConfig, SequenceModel
from training.tasks.base import Batch, scored_accuracy
from training.tasks.words import COUNTRY_LANGUAGE, FILLER_WORDS, FRAME_WORDS
from training.vocabulary import Vocabulary

COUNTRIES = tuple(country for country, _ in COUNTRY_LANGUAGE)
LANGUAGES = tuple(language for _, language in COUNTRY_LANGUAGE)
VOCABULARY = Vocabulary(FRAME_WORDS + COUNTRIES + LANGUAGES + FILLER_WORDS)

_FILLER_IDS = np.array(VOCABULARY.encode(" ".join(FILLER_WORDS)), dtype=np.int64)
_COUNTRY_IDS = VOCABULARY.encode(" ".join(COUNTRIES))
_LANGUAGE_IDS = VOCABULARY.encode(" ".join(LANGUAGES))
_OPENING = VOCABULARY.encode("i grew up in")  # then the country and "."
_CLOSING = VOCABULARY.encode("i speak fluent")  # then the language and "."
_FULL_STOP = VOCABULARY.encode(".")[0]
_FRAME_LENGTH = len(_OPENING) + len(_CLOSING) + 4  # words of a sentence besides its filler


@dataclass(frozen=True)
class LanguageTaskConfig:
    """Curriculum, loss weighting and evaluation grid of the language task (gaps in filler words)."""

    start_max_gap_words: int = 10  # the curriculum's first stage
    train_max_gap_words: int = 200  # no training sentence has a longer filler; evaluation goes beyond
    gap_mean_fraction: float = 0.5  # mean training gap, as a fraction of the curriculum's current maximum
    # Training rows are sentences packed back to back (no padding to waste), this many maximal gaps long
    # plus room for the frame words: three to four sentences per row, each overwriting the last country.
    row_length_gaps: float = 2.0
    language_weight: float = 1.0
    # Every other position: a real LM, but weighted so that it does not drown the dependency. The LM loss
    # also helps early: with the language word alone, learning sat at chance for hundreds of steps.
    other_weight: float = 0.01
    eval_buckets_words: tuple[tuple[int, int], ...] = (
        (0, 50),
        (50, 100),
        (100, 200),
        (200, 300),
        (300, 400),
        (400, 500),
    )
    eval_sentences_per_bucket: int = 500
    # What a training filler is made of, by weight: "uniform" (every word drawn afresh), "bursts" (words
    # repeated in runs of 1-10) and "loop" (a loop of 2-12 words over and over). One kind alone teaches the
    # memory to expect its statistics: trained on uniform words only, the country was lost over 500 words of
    # skewed word frequencies (0.970), long loops (0.960) and one word repeated (0.485); trained on the mix,
    # in the same steps, 1.000, 1.000 and 0.955 (docs/experiments.md).
    filler_mix: tuple[tuple[str, float], ...] = (("uniform", 0.5), ("bursts", 0.25), ("loop", 0.25))


@dataclass(frozen=True)
class Stream:
    """Token ids of one stream and the positions whose next word is a language word."""

    ids: list[int]
    language_positions: list[int]


class LanguageTask:
    """Next-word prediction over sentences whose last content word depends on one far back."""

    name = "language"
    curriculum = True

    def __init__(self, config: LanguageTaskConfig | None = None) -> None:
        self.config = config or LanguageTaskConfig()
        self.vocabulary = VOCABULARY

    def info(self) -> TaskInfo:
        """The vocabulary, which is also the meaning of each output logit."""
        words = list(VOCABULARY.words)
        return TaskInfo(self.name, words, words, "next-word logits over the vocabulary")

    def default_model_config(self) -> ModelConfig:
        """A small LSTM: the task needs memory, not capacity."""
        return ModelConfig("tokens", len(VOCABULARY), len(VOCABULARY), hidden_size=64, embed_size=32)

    def encode(self, text: str) -> list[int]:
        """Word ids of `text`; raises UnknownWordError naming the first unknown word."""
        return VOCABULARY.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """The words of `ids`, space separated."""
        return VOCABULARY.decode(ids)

    def training_batch(self, batch_size: int, difficulty: float, rng: np.random.Generator) -> Batch:
        """Rows of sentences packed back to back, gaps up to the curriculum's current maximum."""
        span = self.config.train_max_gap_words - self.config.start_max_gap_words
        return self._packed_batch(batch_size, self.config.start_max_gap_words + round(difficulty * span), rng)

    def validation_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Streams at full training difficulty."""
        return self._packed_batch(batch_size, self.config.train_max_gap_words, rng)

    def gap_batch(self, gaps: Sequence[int], rng: np.random.Generator) -> Batch:
        """One single-sentence stream per gap length in `gaps`."""
        return self.batch([self.stream([g], rng) for g in gaps], rng)

    def evaluate(self, model: SequenceModel, rng: np.random.Generator) -> dict[str, float]:
        """Language-word accuracy per gap bucket, and after a first sentence with another country."""
        n = self.config.eval_sentences_per_bucket
        metrics = {}
        for lo, hi in self.config.eval_buckets_words:
            batch = self.gap_batch(rng.integers(lo, hi, size=n, endpoint=True).tolist(), rng)
            metrics[f"language_word_acc_gap_{lo}_{hi}"] = scored_accuracy(model, batch)
        metrics["language_word_acc_worst_bucket"] = min(metrics.values())
        longest = self.config.eval_buckets_words[-1][1]
        streams = [
            self.stream(rng.integers(0, longest, size=2, endpoint=True).tolist(), rng) for _ in range(n)
        ]
        metrics["language_word_acc_overwrite"] = scored_accuracy(
            model, self.batch(streams, rng, last_only=True)
        )
        return metrics

    def headline_metric(self) -> str:
        """The worst gap bucket: the claim is about every gap length, not the average."""
        return "language_word_acc_worst_bucket"

    def sample_sequences(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Held-out streams of varied lengths (a few words to a few sentences), training-sized gaps."""
        longest = self._row_length(self.config.train_max_gap_words)
        lengths = rng.integers(8, longest, size=n, endpoint=True)
        rows = [self._packed_stream(int(length), self.config.train_max_gap_words, rng) for length in lengths]
        return [np.array(s.ids, dtype=np.int64) for s in rows]

    def stream(self, gaps: Sequence[int], rng: np.random.Generator) -> Stream:
        """Sentences back to back, one per gap length, each with a different country from the one before."""
        ids: list[int] = []
        positions = []
        # a random walk whose steps are never 0 mod N: never the same country twice in a row
        shifts = rng.integers(1, len(COUNTRIES), size=len(gaps))
        countries = (rng.integers(len(COUNTRIES)) + np.cumsum(shifts)) % len(COUNTRIES)
        for gap, country in zip(gaps, countries, strict=True):
            ids += [*_OPENING, _COUNTRY_IDS[country], _FULL_STOP]
            ids += filler(gap, self.config.filler_mix, rng)
            ids += _CLOSING
            positions.append(len(ids) - 1)  # input "fluent", target the language word
            ids += [_LANGUAGE_IDS[country], _FULL_STOP]
        return Stream(ids, positions)

    def batch(self, streams: Sequence[Stream], rng: np.random.Generator, last_only: bool = False) -> Batch:
        """Left-pad `streams` with filler to one length; score every (or only the last) language word."""
        length = max(len(s.ids) for s in streams)
        x = np.empty((len(streams), length), dtype=np.int64)
        scored = np.zeros((len(streams), length), dtype=bool)
        for row, s in enumerate(streams):
            pad = length - len(s.ids)
            # Padding is real filler, not a pad token: a served stream may also begin mid-text.
            x[row] = np.concatenate([rng.choice(_FILLER_IDS, size=pad), s.ids])
            positions = s.language_positions[-1:] if last_only else s.language_positions
            scored[row, [pad + p for p in positions]] = True
        targets = np.roll(x, -1, axis=1)  # next word; the last step has none and weight 0
        weights = np.where(scored, self.config.language_weight, self.config.other_weight).astype(np.float32)
        weights[:, -1] = 0.0
        return Batch(
            torch.from_numpy(x),
            torch.from_numpy(targets),
            torch.from_numpy(weights),
            torch.from_numpy(scored),
        )

    def _packed_batch(self, batch_size: int, max_gap: int, rng: np.random.Generator) -> Batch:
        length = self._row_length(max_gap)
        return self.batch([self._packed_stream(length, max_gap, rng) for _ in range(batch_size)], rng)

    def _row_length(self, max_gap: int) -> int:
        return round(self.config.row_length_gaps * max_gap) + 2 * _FRAME_LENGTH

    def _packed_stream(self, length: int, max_gap: int, rng: np.random.Generator) -> Stream:
        """`length` words: filler, then sentences back to back, cut off at `length`.

        The leading filler makes rows start mid-text, as a served stream may. A language word cut off by the
        end of the row is not scored.
        """
        mean = max_gap * self.config.gap_mean_fraction
        lead, *gaps = memoryless_gaps(mean, max_gap, length // _FRAME_LENGTH + 1, rng).tolist()
        sentences = int(np.searchsorted(np.cumsum(np.add(gaps, _FRAME_LENGTH)), length - lead)) + 1
        s = self.stream(gaps[:sentences], rng)
        ids = (rng.choice(_FILLER_IDS, size=lead).tolist() + s.ids)[:length]
        return Stream(ids, [lead + p for p in s.language_positions if lead + p < length - 1])


def filler(words: int, mix: Sequence[tuple[str, float]], rng: np.random.Generator) -> list[int]:
    """`words` filler word ids of a kind drawn from `mix` (kind, weight)."""
    kinds, weights = zip(*mix, strict=True)
    kind = kinds[rng.choice(len(kinds), p=np.divide(weights, sum(weights)))]
    if kind == "uniform":
        ids: np.ndarray = rng.choice(_FILLER_IDS, size=words)
    elif kind == "bursts":
        runs = rng.integers(1, 11, size=words)  # more than enough runs
        ids = np.repeat(rng.choice(_FILLER_IDS, size=words), runs)[:words]
    elif kind == "loop":
        loop = rng.choice(_FILLER_IDS, size=int(rng.integers(2, 13)))
        ids = np.resize(loop, words)
    else:
        raise ValueError(f"unknown filler kind {kind!r}: uniform, bursts or loop")
    words_ids: list[int] = ids.tolist()
    return words_ids


def memoryless_gaps(mean: float, max_gap: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gap lengths from a geometric distribution with the given mean, truncated at max_gap.

    Memoryless on purpose: the chance that a filler ends is the same after any number of words, so
    next-word prediction gives no reward for counting them (with uniform gaps it would), and a count is a
    skill that has no reason to carry past the training gaps.
    """
    keep = mean / (mean + 1)  # chance that the filler goes on after each word
    u = rng.random(n) * (1 - keep ** (max_gap + 1))  # inverse CDF restricted to gaps 0..max_gap
    gaps: np.ndarray = np.floor(np.log1p(-u) / np.log(keep)).astype(np.int64)
    return gaps
