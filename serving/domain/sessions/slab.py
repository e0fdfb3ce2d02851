"""Where the in-memory session store keeps every session's recurrent state: rows of a few large arrays.

One array object and one heap block per session would cost about 150 bytes on top of a 1 KiB state, and a
heap of long-lived 1 KiB blocks among short-lived ones (responses, batches) fragments, keeping memory that
cannot go back to the OS. A slab holds `PAGE_ROWS` states per page, allocated zeroed (the OS maps a page's
memory as its rows are first written), and hands rows out and back through a free list, latest freed first.
"""

from __future__ import annotations

import numpy as np

PAGE_BITS = 10
PAGE_ROWS = 1 << PAGE_BITS
_ROW_MASK = PAGE_ROWS - 1
# Fewer rows are stored one by one: below it, the index arrays of a bulk copy cost more than they save
# (the crossover measured in docs/benchmarks.md).
_FEW_ROWS = 24


class StateSlab:
    """Rows of float32 `shape`, addressed by an integer slot. Not thread-safe: the event loop owns it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._pages: list[np.ndarray] = []  # written through these
        self._views: list[np.ndarray] = []  # read-only views of the same pages, handed to readers
        self._free: list[int] = []

    def store(self, state: np.ndarray) -> int:
        """Copy `state` into a free row; returns its slot."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._pages[slot >> PAGE_BITS][slot & _ROW_MASK] = state
        return slot

    def store_many(self, states: np.ndarray) -> list[int]:
        """Copy each row of `states` [rows, ...] into a free row, in one assignment per page touched; their
        slots, in order."""
        count = len(states)
        if count < _FEW_ROWS:
            return [self.store(state) for state in states]
        while len(self._free) < count:
            self._grow()
        slots = self._free[len(self._free) - count :][::-1]  # as `store` would pop them, one by one
        del self._free[len(self._free) - count :]
        index = np.array(slots)
        pages = index >> PAGE_BITS
        # Most often one page: a frame's rows are freed, and taken again, together.
        for page in np.unique(pages).tolist():
            rows = pages == page
            self._pages[page][index[rows] & _ROW_MASK] = states[rows]
        return slots

    def view(self, slot: int) -> np.ndarray:
        """The state in `slot`, read-only. It stays as it is until the slot is released and taken again."""
        row: np.ndarray = self._views[slot >> PAGE_BITS][slot & _ROW_MASK]
        return row

    @property
    def held_bytes(self) -> int:
        """Bytes of the pages allocated (rows in use or free)."""
        return sum(page.nbytes for page in self._pages)

    def release(self, *slots: int) -> None:
        """Give `slots` back; the next `store` may reuse them."""
        self._free.extend(slots)

    def _grow(self) -> None:
        page = np.zeros((PAGE_ROWS, *self._shape), np.float32)
        view = page.view()
        view.flags.writeable = False
        first = len(self._pages) * PAGE_ROWS
        self._pages.append(page)
        self._views.append(view)
        self._free.extend(range(first + PAGE_ROWS - 1, first - 1, -1))  # popped lowest first
