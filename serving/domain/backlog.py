"""Holding a batch for company: a chunk whose answer will wait behind others anyway runs with more chunks.

gRPC reads and sends one message at a time on a stream. With many sessions multiplexed on one stream, chunks
reach the batcher one or two per loop pass, so batches flushed at once stay at one to three rows, while the
answers queue up to be sent. A chunk whose stream already has answers queued ahead of its own is answered no
later if its batch runs when that queue has drained, so the batcher holds it until then: the batch grows by
what the stream delivers meanwhile, and costs less per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# The longest a batch is held: a stream whose client stops reading never drains.
HOLD_MAX_S = 0.01


class Backlog(Protocol):
    """The queue a chunk's answer joins (`serving.server.outbox.Outbox`: a stream's outgoing messages)."""

    def ahead(self) -> bool:
        """Whether enough answers wait ahead in it that one added after another batch would leave no later."""

    def on_drain(self, wake: Callable[[], None]) -> None:
        """Call `wake` once, when `ahead` turns false."""
