"""A chunk and its result as the domain sees them, and the rules a chunk must keep before anything runs."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from modelcard import ModelSpec
from serving.domain.errors import InvalidChunkError, InvalidSessionIdError

_ID = r"[A-Za-z0-9._:-]{1,128}"
_SESSION_ID = re.compile(_ID)
_SESSION_IDS = re.compile(rf"(?:{_ID}\n)*")  # many ids, each ended by a newline: one match checks them all
_SHORT_CHUNK = 64  # timesteps
# A chunk's digest starts with its flags byte: hashers that have taken each of the 16, copied for each chunk
# (half the cost of a new hasher, for the short chunks of a stream).
_FLAGGED = [hashlib.blake2b(bytes((flags,)), digest_size=16) for flags in range(16)]


class OutputMode(enum.Enum):
    """Which timesteps' outputs a result carries."""

    ALL = "all"  # [time, outputs]
    LAST = "last"  # [1, outputs]


class Chunk(NamedTuple):
    """One chunk of one session's sequence, as the client sent it (see the proto's ChunkRequest).

    Chunks and results are named tuples: immutable, and built for every request at a third of a frozen
    dataclass's cost.
    """

    session_id: str  # empty with start: the server issues one
    inputs: np.ndarray  # int64 [time] (tokens) or float32 [time, features]
    offset: int  # timesteps the client believes the session has consumed
    start: bool = False
    end: bool = False
    reset: bool = False
    snapshot: bytes = b""
    outputs: OutputMode = OutputMode.ALL
    namespace: str = ""  # the tenant whose session this is ("" without tenants)
    # Applied at the session's step count, whatever `offset` says: for protocols without offsets (the Open
    # Inference Protocol's sequences). Such a chunk sent twice is applied twice.
    append: bool = False


class ChunkResult(NamedTuple):
    """A chunk's result, or the cached result of a repeated chunk (`replayed`)."""

    session_id: str
    offset: int  # steps before the chunk
    steps: int  # steps after it
    outputs: np.ndarray  # float32 [time, outputs] or [1, outputs]
    ended: bool
    replayed: bool


@dataclass(frozen=True)
class ServedModel:
    """The served model and the limits a client must respect."""

    spec: ModelSpec
    max_chunk_steps: int
    idle_ttl_s: float
    # Most bytes of outputs a session keeps to answer a retry of its last chunk. A larger response is not
    # kept (its retry is ABORTED, never applied twice): what one client can make the server hold is bounded.
    replay_max_bytes: int = 65536

    @property
    def state_shape(self) -> tuple[int]:
        """A session's state: one float32 row holding every state tensor (`modelcard.layout`) and, framed,
        the samples it carries (`serving.domain.stepping`)."""
        return (self.spec.session_size,)

    @property
    def framed(self) -> bool:
        """Whether a step is a sample, run in windows of them."""
        return self.spec.framing is not None

    @property
    def max_chunk_inputs(self) -> int:
        """The most steps a chunk holds: `max_chunk_steps`, or (framed) that many windows of samples."""
        framing = self.spec.framing
        return self.max_chunk_steps * (framing.window if framing else 1)


def session_key(namespace: str, session_id: str) -> str:
    """Where a session is kept: its id within its tenant's namespace. A session id never holds "/", so two
    tenants' keys never meet, whatever ids they choose."""
    return f"{namespace}/{session_id}" if namespace else session_id


def split_key(key: str) -> tuple[str, str]:
    """(namespace, session id) of a session key."""
    namespace, slash, session_id = key.partition("/")
    return (namespace, session_id) if slash else ("", key)


def validate(chunk: Chunk, model: ServedModel, *, values: bool = True) -> None:
    """Raise `InvalidChunkError` (or `InvalidSessionIdError`) unless `chunk` keeps the contract's rules;
    `values=False` leaves its inputs' values to the caller (a frame checks them as one block)."""
    if chunk.session_id:
        check_session_id(chunk.session_id)
    elif not chunk.start:
        raise InvalidChunkError("session_id is empty: set it, or send start to have the server issue one")
    if (chunk.reset or chunk.snapshot) and not chunk.start:
        raise InvalidChunkError("reset and snapshot only apply with start")
    if chunk.offset < 0 and not chunk.append:
        raise InvalidChunkError(f"offset must be >= 0, got {chunk.offset}")
    check_shape(chunk.inputs, model)
    if values:
        check_values(chunk.inputs, model)


def check_session_id(session_id: str) -> None:
    """Raise `InvalidSessionIdError` unless `session_id` is 1-128 characters of [A-Za-z0-9._:-]."""
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidSessionIdError(session_id)


def session_ids_valid(session_ids: list[str]) -> bool:
    """Whether every id passes `check_session_id` (one match over them all: a frame's many ids)."""
    lines = "\n".join(session_ids) + "\n"
    # The count: an id holding a newline would pass as two.
    return lines.count("\n") == len(session_ids) and _SESSION_IDS.fullmatch(lines) is not None


def check_shape(x: np.ndarray, model: ServedModel) -> None:
    """Raise `InvalidChunkError` unless `x` has the dtype and shape of a chunk for `model`."""
    spec = model.spec
    tokens = spec.input_kind == "tokens"
    shape_ok = x.ndim == 1 if tokens else x.ndim == 2 and x.shape[1] == spec.input_size
    if x.dtype != spec.input_dtype or not shape_ok:
        wanted = (
            "INT64 token ids of shape [time]" if tokens else f"FLOAT32 of shape [time, {spec.input_size}]"
        )
        if model.framed:
            wanted = "FLOAT32 samples of shape [samples, 1]"
        raise InvalidChunkError(f"inputs must be {wanted}, got {x.dtype.name} {list(x.shape)}")
    if not 1 <= len(x) <= model.max_chunk_inputs:
        unit = "samples" if model.framed else "timesteps"
        raise InvalidChunkError(f"a chunk holds 1 to {model.max_chunk_inputs} {unit}, got {len(x)}")


def check_values(x: np.ndarray, model: ServedModel) -> None:
    """Raise `InvalidChunkError` if a chunk `x` of the right shape holds a value `model` cannot take."""
    spec = model.spec
    tokens = spec.input_kind == "tokens"
    # One reduction instead of min and max: a negative id read as unsigned is larger than any vocabulary.
    if tokens and _largest_id(x) >= spec.input_size:
        bad = int(x[(x < 0) | (x >= spec.input_size)][0])
        raise InvalidChunkError(f"token id {bad} is outside the vocabulary [0, {spec.input_size})")
    if not tokens and not np.isfinite(x).all():
        first = int(np.argmin(np.isfinite(x).all(axis=1)))
        raise InvalidChunkError(f"inputs hold NaN or infinite values (first at timestep {first})")


def _largest_id(x: np.ndarray) -> int:
    # Read as unsigned, a negative id is larger than any vocabulary: one maximum checks both ends. A short
    # chunk, the common case when streaming, is faster to check as a list than with a numpy reduction.
    unsigned = x.view(np.uint64)
    return max(unsigned.tolist()) if len(x) <= _SHORT_CHUNK else int(unsigned.max())


def chunk_digest(chunk: Chunk) -> bytes:
    """What identifies a repeat of the same chunk: its flags and its bytes (16 bytes of BLAKE2b)."""
    # The shape needs no place in the key: a valid chunk's shape follows from its byte length and the model.
    flags = chunk.start | chunk.end << 1 | chunk.reset << 2 | (chunk.outputs is OutputMode.LAST) << 3
    hasher = _FLAGGED[flags].copy()
    hasher.update(chunk.inputs.tobytes())
    if chunk.snapshot:
        hasher.update(chunk.snapshot)
    return hasher.digest()


def continued_digests(block: np.ndarray, outputs: OutputMode) -> list[bytes]:
    """`chunk_digest` of each row of `block` [rows, time, ...], chunks that only continue their sessions (no
    start, end, reset or snapshot), from one copy of the block's bytes."""
    raw = np.ascontiguousarray(block).data.cast("B")  # rows sliced without copying them
    width = len(raw) // len(block)
    flagged = _FLAGGED[(outputs is OutputMode.LAST) << 3]
    digests = []
    for first in range(0, len(raw), width):
        hasher = flagged.copy()
        hasher.update(raw[first : first + width])
        digests.append(hasher.digest())
    return digests
