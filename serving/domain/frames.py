"""What applying a frame (one chunk for each of many sessions, as columns) adds to applying a chunk: a session
at most once per frame, the chunks' rules and inputs' values checked column by column, and each session's
outcome kept apart, so that one session's error never fails another.

A frame stays columns from the wire to the answer. Its usual row, a session continuing at its step count,
never becomes an object of its own; its other rows (a start, an end, a repeat, an error) are judged as the
chunks they are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from serving.domain.chunks import (
    Chunk,
    ChunkResult,
    OutputMode,
    ServedModel,
    check_shape,
    check_values,
    session_ids_valid,
    session_key,
    validate,
)
from serving.domain.errors import InvalidChunkError, ServingError


class Frame(NamedTuple):
    """One chunk, all of one length, for each of many sessions (the proto's Frame): row i is the chunk of
    `session_ids[i]`, its timesteps `inputs[i]`."""

    session_ids: list[str]  # an empty one with start: the server issues one
    inputs: np.ndarray  # [sessions, time] token ids, or [sessions, time, features]
    offsets: list[int]
    start: list[bool]
    end: list[bool]
    reset: list[bool]
    snapshots: list[bytes]
    outputs: OutputMode = OutputMode.ALL
    namespace: str = ""

    def chunk(self, row: int) -> Chunk:
        """Row `row` as a chunk of its own."""
        return Chunk(
            self.session_ids[row],
            self.inputs[row],
            self.offsets[row],
            self.start[row],
            self.end[row],
            self.reset[row],
            self.snapshots[row],
            self.outputs,
            self.namespace,
        )

    def continuing(self) -> list[bool]:
        """Which rows only continue their session: no start, end, reset or snapshot."""
        if not (any(self.start) or any(self.end) or any(self.reset) or any(self.snapshots)):
            return [True] * len(self.session_ids)
        flags = zip(self.start, self.end, self.reset, self.snapshots, strict=True)
        return [not (start or end or reset or snapshot) for start, end, reset, snapshot in flags]


@dataclass(slots=True)
class FrameOutcome:
    """Each session's outcome of a frame, as columns. A failed row's error is in `errors`; its steps stay -1
    and its outputs zero."""

    session_ids: list[str]  # the frame's, with the ids the server issued in place of empty ones
    outputs: np.ndarray  # float32 [sessions, time (1 for OutputMode.LAST), outputs]
    steps: list[int]  # after the chunk
    ended: list[bool]
    replayed: list[bool]
    errors: dict[int, Exception]
    # A framed model: how many of each row's outputs are windows its chunk completed (the rest are zeros).
    output_steps: np.ndarray | None = None

    @classmethod
    def pending(cls, frame: Frame, output_size: int, most_outputs: int, framed: bool) -> FrameOutcome:
        """A frame's outcome before any row is answered: each starting session without an id has one.
        `most_outputs`: the most outputs one of its chunks can have; `framed`: rows may have fewer."""
        sessions = len(frame.inputs)
        issued = [
            session_id or (uuid.uuid4().hex if start else "")
            for session_id, start in zip(frame.session_ids, frame.start, strict=True)
        ]
        rows = min(1, most_outputs) if frame.outputs is OutputMode.LAST else most_outputs
        outputs = np.zeros((sessions, rows, output_size), np.float32)
        counts = np.zeros(sessions, np.int64) if framed else None
        return cls(issued, outputs, [-1] * sessions, [False] * sessions, [False] * sessions, {}, counts)

    def record(self, rows: list[int], outputs: np.ndarray, counts: np.ndarray | None) -> None:
        """The outputs of rows that ran (and, framed, how many of each are their own)."""
        self.outputs[rows] = outputs
        if self.output_steps is not None and counts is not None:
            self.output_steps[rows] = counts

    def write(self, row: int, result: ChunkResult) -> None:
        """Row `row`'s answer: a chunk's result, as it would be alone."""
        self.outputs[row, : len(result.outputs)] = result.outputs
        if self.output_steps is not None:
            self.output_steps[row] = len(result.outputs)
        self.steps[row] = result.steps
        self.ended[row] = result.ended
        self.replayed[row] = result.replayed

    def answer(self, row: int, outcome: ChunkResult | Exception) -> None:
        """Row `row`'s answer: its result (`write`), or the error of its session alone."""
        if isinstance(outcome, ChunkResult):
            self.write(row, outcome)
        else:
            self.errors[row] = outcome

    def settle(self, frame: Frame) -> None:
        """Clear what a failed row may hold (a run's outputs, an issued id) once every row is answered."""
        if self.errors:
            self.outputs[list(self.errors)] = 0
            if self.output_steps is not None:
                self.output_steps[list(self.errors)] = 0
            for row in self.errors:
                self.session_ids[row] = frame.session_ids[row]

    @property
    def answered(self) -> int:
        """Rows that did not fail."""
        return len(self.steps) - len(self.errors)


def keys_of(frame: Frame, outcome: FrameOutcome) -> list[str]:
    """Where each row's session is kept."""
    if not frame.namespace:
        return outcome.session_ids
    return [session_key(frame.namespace, session_id) for session_id in outcome.session_ids]


def refused(frame: Frame, keys: list[str], model: ServedModel) -> dict[int, ServingError]:
    """The rows that cannot run, and why, each with the message its chunk would get alone: one that breaks
    `validate`'s rules, a session that came earlier in the frame (its first chunk goes on), inputs holding a
    value the model cannot take."""
    errors = _broken(frame, model)
    if len(set(keys)) < len(keys):
        errors |= _repeated(keys, frame.session_ids, errors)
    return errors | _bad_values(frame.inputs, model, errors)


def _broken(frame: Frame, model: ServedModel) -> dict[int, ServingError]:
    """The rows that break `validate`'s rules (values aside), found column by column: a row is validated alone
    only when a column shows a break somewhere."""
    try:
        check_shape(frame.inputs[0], model)  # the rows share a shape: all of them fit, or none
    except InvalidChunkError as error:
        return dict.fromkeys(range(len(frame.session_ids)), error)
    if (
        session_ids_valid(frame.session_ids)
        and min(frame.offsets) >= 0
        and not any(reset or snapshot for reset, snapshot in zip(frame.reset, frame.snapshots, strict=True))
    ):
        return {}
    errors: dict[int, ServingError] = {}
    for row in range(len(frame.session_ids)):
        try:
            validate(frame.chunk(row), model, values=False)
        except ServingError as error:
            errors[row] = error
    return errors


def _repeated(
    keys: list[str], session_ids: list[str], errors: dict[int, ServingError]
) -> dict[int, ServingError]:
    """The rows of a session that came earlier in the frame."""
    seen: set[str] = set()
    repeated: dict[int, ServingError] = {}
    for row, key in enumerate(keys):
        if key in seen and row not in errors:
            repeated[row] = InvalidChunkError(
                f"session {session_ids[row]!r} appears more than once in the frame (one chunk per session)"
            )
        seen.add(key)
    return repeated


def _bad_values(
    block: np.ndarray, model: ServedModel, errors: dict[int, ServingError]
) -> dict[int, ServingError]:
    """The rows whose inputs hold a value the model cannot take (a token id outside the vocabulary, NaN or
    infinity), found in one pass over `block`."""
    if len(errors) == len(block):
        return {}
    spec = model.spec
    if spec.input_kind == "tokens":
        bad = (block.view(np.uint64) >= spec.input_size).any(axis=1)  # a negative id read unsigned is huge
    else:
        bad = ~np.isfinite(block).all(axis=(1, 2))
    found: dict[int, ServingError] = {}
    for row in np.flatnonzero(bad).tolist():
        if row not in errors:
            try:
                check_values(block[row], model)
            except InvalidChunkError as error:
                found[row] = error
    return found
