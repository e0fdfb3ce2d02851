"""The bad requests a soak mixes in, each with the status code the contract gives it (the bad-input table of
docs/protocol.md). They are sent in turn, so a run of any length covers them all about equally."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serving.client import ModelInfo
from serving.wire import pb
from serving.wire.tensors import encode


@dataclass(frozen=True)
class Spot:
    """Where a bad request lands: a live session at `offset`, and valid inputs for its model."""

    session_id: str
    offset: int  # >= 1: the session has consumed a chunk
    info: ModelInfo
    inputs: Callable[[int], np.ndarray]  # steps -> valid inputs


@dataclass(frozen=True)
class BadCase:
    """One kind of bad request: sent as a chunk (Stream or Step) or as an EndSession of its session id."""

    name: str
    code: str  # the grpc.StatusCode name it must get
    build: Callable[[Spot], pb.ChunkRequest]
    rpc: Literal["chunk", "end"] = "chunk"


def _near(spot: Spot, **fields: Any) -> pb.ChunkRequest:
    """A valid next chunk of the spot's session, but for `fields`."""
    fields.setdefault("session_id", spot.session_id)
    fields.setdefault("offset", spot.offset)
    fields.setdefault("inputs", encode(spot.inputs(2)))
    return pb.ChunkRequest(**fields)


def _ghost() -> str:
    return f"ghost-{uuid.uuid4().hex}"  # never started by anyone


def _wrong_dtype(spot: Spot) -> pb.ChunkRequest:
    x = spot.inputs(2)
    return _near(spot, inputs=encode(x.astype(np.float32 if spot.info.takes_tokens else np.int64)))


def _wrong_shape(spot: Spot) -> pb.ChunkRequest:
    if spot.info.takes_tokens:
        return _near(spot, inputs=encode(spot.inputs(2).reshape(2, 1)))
    return _near(spot, inputs=encode(np.zeros((2, spot.info.input_size + 1), np.float32)))


def _out_of_range(spot: Spot) -> pb.ChunkRequest:
    x = spot.inputs(3).copy()
    if spot.info.takes_tokens:
        x[1] = spot.info.input_size  # one past the vocabulary
    else:
        x[1, 0] = np.nan
    return _near(spot, inputs=encode(x))


def _short_data(spot: Spot) -> pb.ChunkRequest:
    tensor = encode(spot.inputs(3))
    tensor.data = tensor.data[: len(tensor.data) // 2]
    return _near(spot, inputs=tensor)


def _undefined_dtype(spot: Spot) -> pb.ChunkRequest:
    tensor = encode(spot.inputs(2))
    tensor.dtype = pb.DType.ValueType(77)
    return _near(spot, inputs=tensor)


_INVALID = "INVALID_ARGUMENT"
CASES: tuple[BadCase, ...] = (
    BadCase("unknown session", "NOT_FOUND", lambda s: _near(s, session_id=_ghost(), offset=0)),
    BadCase("start on a live session", "ALREADY_EXISTS", lambda s: _near(s, offset=0, start=True)),
    BadCase("offset ahead", "ABORTED", lambda s: _near(s, offset=s.offset + 5)),
    BadCase("offset behind", "ABORTED", lambda s: _near(s, offset=s.offset - 1)),
    BadCase("negative offset", _INVALID, lambda s: _near(s, offset=-1)),
    BadCase("wrong dtype", _INVALID, _wrong_dtype),
    BadCase("wrong shape", _INVALID, _wrong_shape),
    BadCase("empty chunk", _INVALID, lambda s: _near(s, inputs=encode(s.inputs(0)))),
    BadCase(
        "over max_chunk_steps",
        _INVALID,
        lambda s: _near(s, inputs=encode(s.inputs(s.info.max_chunk_steps + 1))),
    ),
    BadCase("token or value out of range", _INVALID, _out_of_range),
    BadCase("data size not the shape's", _INVALID, _short_data),
    BadCase("undefined dtype", _INVALID, _undefined_dtype),
    BadCase("undefined outputs mode", _INVALID, lambda s: _near(s, outputs=pb.OutputMode.ValueType(9))),
    BadCase("invalid session id", _INVALID, lambda s: _near(s, session_id="a/b c")),
    BadCase("reset without start", _INVALID, lambda s: _near(s, reset=True)),
    BadCase(
        "not a snapshot",
        _INVALID,
        lambda s: _near(s, session_id=_ghost(), offset=0, start=True, snapshot=b"junk"),
    ),
    BadCase("EndSession of an unknown session", "NOT_FOUND", lambda s: _near(s, session_id=_ghost()), "end"),
)
# Not in turn: sent by a session that has just ended, to its own id (see traffic.py).
AFTER_END = BadCase("chunk after its session ended", "NOT_FOUND", _near)


def in_turn() -> Callable[[], BadCase]:
    """The next bad case, round the catalogue."""
    cycle = itertools.cycle(CASES)
    return lambda: next(cycle)
