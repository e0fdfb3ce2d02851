"""What applying a frame (one chunk for each of many sessions) adds to applying a chunk: a session at most
once per frame, and each session's outcome kept apart, so that one session's error never fails another."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from serving.domain.chunks import ChunkResult, split_key
from serving.domain.errors import InvalidChunkError, SessionNotFoundError

_T = TypeVar("_T")
Outcome = ChunkResult | Exception  # a frame's session: its result, or its error alone


def misfits(keys: dict[int, str], lengths: dict[int, int]) -> dict[int, InvalidChunkError]:
    """The frame positions that cannot join it, and why: a session that came earlier in the frame (its first
    chunk goes on), or a chunk of another length than the frame's first (a frame runs as one batch)."""
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


async def outcome(session_id: str, step: Awaitable[_T]) -> _T | Exception:
    """`step`'s value, or its error (naming the session as the client does: the store knows its key)."""
    try:
        return await step
    except SessionNotFoundError:
        return SessionNotFoundError(session_id)
    except Exception as error:  # a frame's session fails alone, whatever failed
        return error
