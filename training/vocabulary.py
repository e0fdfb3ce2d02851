"""Word <-> id mapping for token models. Pure Python on purpose: the serving image (no torch) can use it with
the vocabulary carried in the checkpoint's TaskInfo or the model card."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class UnknownWordError(ValueError):
    """A word outside the model's vocabulary."""


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of distinct words; a word's id is its index."""

    words: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {word: i for i, word in enumerate(self.words)}
        if len(index) != len(self.words):
            raise ValueError("vocabulary words must be distinct")
        object.__setattr__(self, "_index", index)  # frozen: the lookup table is derived, set once here

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Word ids of `text` (case-insensitive, "." is a word); an unknown word raises UnknownWordError."""
        ids = []
        for word in text.lower().replace(".", " . ").split():
            if word not in self._index:
                raise UnknownWordError(
                    f"unknown word {word!r}: the model knows {len(self.words)} words, "
                    f"for example {', '.join(self.words[:8])}"
                )
            ids.append(self._index[word])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Join the words of `ids` with spaces; an id out of range raises UnknownWordError."""
        for i in ids:
            if not 0 <= i < len(self.words):
                raise UnknownWordError(f"word id {i} is out of range 0..{len(self.words) - 1}")
        return " ".join(self.words[i] for i in ids)
