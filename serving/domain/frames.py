"""What applying a frame (one chunk for each of many sessions) adds to applying a chunk: a session at most
once per frame, one chunk length, the inputs' values checked as one block, and each session's outcome kept
apart, so that one session's error never fails another."""

from __future__ import annotations

import numpy as np

from serving.domain.chunks import ServedModel, check_values, split_key
from serving.domain.errors import InvalidChunkError


def misfits(keys: dict[int, str], lengths: dict[int, int]) -> dict[int, InvalidChunkError]:
    """The frame positions that cannot join it, and why: a session that came earlier in the frame (its first
    chunk goes on), or a chunk of another length than the frame's first (a frame runs as one batch)."""
    if len(set(keys.values())) == len(keys) and len(set(lengths.values())) <= 1:
        return {}  # the usual frame: distinct sessions, one length
    seen: set[str] = set()
    refused = {}
    length = next(iter(lengths.values()), 0)
    for index, key in keys.items():
        session_id = split_key(key)[1]
        if key in seen:
            refused[index] = InvalidChunkError(
                f"session {session_id!r} appears more than once in the frame (one chunk per session)"
            )
        elif lengths[index] != length:
            refused[index] = InvalidChunkError(
                f"session {session_id!r}'s chunk has {lengths[index]} steps, not the frame's {length}"
            )
        seen.add(key)
    return refused


def value_errors(block: np.ndarray, positions: list[int], model: ServedModel) -> dict[int, InvalidChunkError]:
    """The frame positions whose inputs hold a value the model cannot take (a token id outside the
    vocabulary, NaN or infinity), found in one pass over `block` [rows, time, ...] (row i: `positions[i]`),
    each with the message its chunk alone would get."""
    spec = model.spec
    if spec.input_kind == "tokens":
        bad = (block.view(np.uint64) >= spec.input_size).any(axis=1)  # a negative id read unsigned is huge
    else:
        bad = ~np.isfinite(block).all(axis=(1, 2))
    refused = {}
    for row in np.flatnonzero(bad).tolist():
        try:
            check_values(block[row], model)
        except InvalidChunkError as error:
            refused[positions[row]] = error
    return refused
