"""Input framing: a model that takes fixed windows of a sample stream (silero VAD: 512 samples at 16 kHz, each
run with the 64 samples before it), served to clients that send samples in chunks of any size.

A session's offset counts samples. Window k covers samples [k * window, (k + 1) * window) and runs with the
`context` samples before it (zeros before the stream's start), so the graph's input for window k is the
`context + window` samples ending at (k + 1) * window. What a session must keep between chunks is its carry:
its last `context + window - 1` samples (zeros where the stream had none yet). With the offset, which says how
far into its window the stream is, the carry and the next chunk hold every window the chunk completes, and
the new carry is the last `context + window - 1` samples of the two together.

numpy only: the server cuts windows with it, and `modelcard.graph` checks a framed graph's chunk invariance
with it at card time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Framing:
    """The card's `framing`: the graph takes `context + window` samples per run, `window` of them new."""

    window: int
    context: int

    def __post_init__(self) -> None:
        if self.window < 1 or self.context < 0:
            raise ValueError(f"a window holds at least 1 sample and a context at least 0, got {self}")

    @property
    def width(self) -> int:
        """Samples the graph takes per run."""
        return self.context + self.window

    @property
    def carry(self) -> int:
        """Samples a session keeps between chunks."""
        return self.context + self.window - 1

    def windows(self, offset: int, samples: int) -> int:
        """Windows that `samples` more samples complete on a stream `offset` samples in."""
        return (offset + samples) // self.window - offset // self.window

    def most_windows(self, samples: int) -> int:
        """The most windows a chunk of `samples` samples can complete (at the worst phase)."""
        return (samples + self.window - 1) // self.window

    def cut(
        self, carry: np.ndarray, offsets: np.ndarray, samples: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows that each complete the same number m of windows: `carry` [rows, carry], `offsets` [rows] (each
        stream's samples so far), `samples` [rows, n] -> the graph's inputs [rows, m, width] and the new
        carry [rows, carry] (new arrays)."""
        stream = np.concatenate([carry, samples], axis=1)  # [rows, carry + n]
        count = self.windows(int(offsets[0]), samples.shape[1])
        # Window j of a row whose stream is `phase` samples into its window starts at index
        # (window - 1 - phase) + j * window of `stream` (docstring above: its width ends on a boundary).
        starts = (self.window - 1 - offsets % self.window)[:, None] + np.arange(count) * self.window
        # Every window of `width` samples as a view, then one gather of the wanted ones: a tick's windows of
        # 150 calls in 0.08 ms, where an index array of every sample (take_along_axis) took 1.4.
        every = np.lib.stride_tricks.sliding_window_view(stream, self.width, axis=1)
        windows = every[np.arange(len(stream))[:, None], starts]
        return windows, np.ascontiguousarray(stream[:, stream.shape[1] - self.carry :])

    def zeros(self, rows: int) -> np.ndarray:
        """The carry of streams that have not started."""
        return np.zeros((rows, self.carry), np.float32)

    def to_dict(self) -> dict[str, int]:
        """The card's entry."""
        return {"window": self.window, "context": self.context}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Framing:
        """The framing a card's entry describes; `KeyError`/`TypeError`/`ValueError` when malformed."""
        window, context = entry["window"], entry["context"]
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (window, context)):
            raise TypeError(f"framing window and context must be integers, got {entry}")
        return cls(window, context)


def cut_whole(framing: Framing, samples: np.ndarray) -> np.ndarray:
    """Every window of a whole stream `samples` [n], as the graph takes them: [windows, width]."""
    windows, _ = framing.cut(framing.zeros(1), np.zeros(1, np.int64), samples[None])
    whole: np.ndarray = windows[0]
    return whole
