"""The soak's sessions, one after another in each of its slots.

A session opens, streams chunks of random sizes over the Stream RPC, in frames (the Frames RPC: the chunks of
a connection's sessions sent in one loop pass share one) or as unary Step calls, and on the way may
idle (for less than the TTL), reconnect (a connection of its own, going on at its offset), retry (resend its
last chunk: it must come back as a replay, identical) or send a bad request (which must get its code and leave
the session as it was). It ends with its last chunk, with EndSession, or is left to expire (a chunk after the
TTL must find it gone). Its outputs are then checked against a fresh session fed its whole sequence at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from serving.bench.soak.cases import AFTER_END, BadCase, Spot, in_turn
from serving.bench.soak.tally import OK, Tally
from serving.bench.wire import CHANNEL_OPTIONS
from serving.client import AsyncConveyorClient, ClientOptions, ConveyorError, ModelInfo, RetryPolicy
from serving.wire import pb
from serving.wire.tensors import decode, encode

T = TypeVar("T")

# Before each chunk after the first, one of these detours may come first (probabilities).
P_BAD, P_RETRY, P_RECONNECT, P_IDLE = 0.06, 0.05, 0.03, 0.03
P_RETRY_AFTER_RECONNECT = 0.5  # as after an answer lost with the old connection
P_STEP, P_FRAME = 0.25, 0.25  # a request goes as a unary Step call, or in a frame, else over the Stream
P_LAST = 0.2  # a chunk asks for its last timestep's outputs only
P_ISSUED = 0.2  # a session lets the server issue its id
P_AFTER_END = 0.5  # an ended session is sent its ending chunk again (a replay) or one more chunk (NOT_FOUND)
ENDINGS = ("end flag", "EndSession", "expiry")
ENDING_WEIGHTS = (0.65, 0.2, 0.15)
MAX_CHUNK_STEPS = 32
SESSION_STEPS = (8, 400)  # a session's length, at most the longest chunk: its check runs it in one
IDLE_SHARE = (0.2, 0.4)  # an idle pause, as a share of the TTL (or of MAX_IDLE_S, when that is less)
MAX_IDLE_S = 5.0
THINK_CAP = 4.0  # a pause between requests is at most this many times the mean: idle + think stay < TTL
EXPIRY_MARGIN_S = 1.0  # after the TTL, before the chunk that must find the session gone
TOLERANCE = 1e-5  # scaled difference (relative above magnitude 1), as the README promises


class OwnConnection(ClientOptions):
    """Client options whose channel gets a connection of its own: grpc otherwise shares one connection among
    channels to the same target, and a reconnect would reuse the connection it means to drop."""

    def channel_options(self) -> list[tuple[str, Any]]:
        """The client's channel arguments, and a subchannel pool of the channel's own."""
        return [*super().channel_options(), *CHANNEL_OPTIONS]


# No client-side retries: the soak sees every answer, and does its retries itself, on purpose.
CLIENT_OPTIONS = OwnConnection(timeout_s=10.0, retry=RetryPolicy(max_attempts=1))


@dataclass
class _Session:
    """One session as the soak drives it: where it is, and what it got (for the check of its outputs)."""

    shared: AsyncConveyorClient
    session_id: str  # "" until the server issues one
    own: AsyncConveyorClient | None = None  # its own connection, once it has reconnected
    offset: int = 0
    inputs: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # the timesteps each answer's outputs belong to
    outputs: list[np.ndarray] = field(default_factory=list)
    last: tuple[pb.ChunkRequest, pb.ChunkResponse] | None = None  # the last applied chunk, to retry

    @property
    def client(self) -> AsyncConveyorClient:
        return self.own or self.shared

    def accept(self, request: pb.ChunkRequest, response: pb.ChunkResponse, x: np.ndarray) -> None:
        request.session_id = response.session_id  # a retry of a first chunk goes to the id the server issued
        self.session_id = response.session_id
        first = self.offset if request.outputs == pb.OUTPUT_MODE_ALL else response.steps - 1
        self.rows.append(np.arange(first, response.steps))
        self.outputs.append(decode(response.outputs))
        self.inputs.append(x)
        self.offset = response.steps
        self.last = (request, response)


class Traffic:
    """Drives sessions against one server; counts everything in `tally`."""

    def __init__(self, target: str, info: ModelInfo, tally: Tally, think_s: float, expiry: bool) -> None:
        self._target, self._info, self._tally, self._think_s = target, info, tally, think_s
        self._endings = ENDINGS if expiry else ENDINGS[:-1]
        weights = np.array(ENDING_WEIGHTS[: len(self._endings)])
        self._ending_weights = weights / weights.sum()
        self._most_steps = min(SESSION_STEPS[1], info.max_chunk_steps)
        self._next_bad = in_turn()

    async def session(self, shared: AsyncConveyorClient, rng: np.random.Generator) -> None:
        """One session from its first chunk to its end, and the check of its outputs."""
        session = _Session(shared, "" if rng.random() < P_ISSUED else f"soak-{uuid.uuid4().hex}")
        ending = str(rng.choice(self._endings, p=self._ending_weights))
        try:
            if await self._stream(session, rng, ending):
                await self._finish(session, rng, ending)
        finally:
            if session.own is not None:
                await session.own.close()

    async def _stream(self, s: _Session, rng: np.random.Generator, ending: str) -> bool:
        length = int(rng.integers(SESSION_STEPS[0], self._most_steps + 1))
        while s.offset < length:
            if s.offset and not await self._detour(s, rng):
                return False
            steps = min(int(rng.integers(1, MAX_CHUNK_STEPS + 1)), length - s.offset)
            if not await self._chunk(s, rng, steps, end=ending == "end flag" and s.offset + steps == length):
                return False
            await asyncio.sleep(min(rng.exponential(self._think_s), THINK_CAP * self._think_s))
        return True

    async def _detour(self, s: _Session, rng: np.random.Generator) -> bool:
        """Maybe something else before the next chunk; False when the session cannot go on."""
        detours: tuple[tuple[float, Callable[[_Session, np.random.Generator], Awaitable[bool]]], ...] = (
            (P_BAD, self._send_bad),
            (P_RETRY, self._retry),
            (P_RECONNECT, self._reconnect),
            (P_IDLE, self._idle),
        )
        draw = rng.random()
        for probability, detour in detours:
            if draw < probability:
                return await detour(s, rng)
            draw -= probability
        return True

    async def _chunk(self, s: _Session, rng: np.random.Generator, steps: int, end: bool) -> bool:
        x = self._inputs(rng, steps)
        request = pb.ChunkRequest(
            session_id=s.session_id,
            inputs=encode(x),
            offset=s.offset,
            start=s.offset == 0,
            end=end,
            outputs=pb.OUTPUT_MODE_LAST if rng.random() < P_LAST else pb.OUTPUT_MODE_ALL,
        )
        response = await self._ask("chunk", self._send(s, request, rng))
        if response is None:
            return False
        problem = _problem(request, response, steps, self._info.output_size)
        self._tally.check("answer", problem is None, f"session {s.session_id or '(new)'}: {problem}")
        if problem is not None:
            return False
        if request.start:
            self._tally.count("opened" if s.session_id else "opened, id issued")
        s.accept(request, response, x)
        self._tally.count("timesteps", steps)
        return True

    async def _retry(self, s: _Session, rng: np.random.Generator) -> bool:
        """Resend the last applied chunk, as a client whose answer was lost: the same answer must come back,
        marked as a replay, and nothing applied twice."""
        assert s.last is not None  # detours come after the first chunk
        request, first = s.last
        self._tally.count("retry")
        again = await self._ask("retry", self._send(s, request, rng))
        if again is None:
            return False
        same = (again.replayed, again.steps, again.ended) == (True, first.steps, first.ended)
        same = same and again.outputs == first.outputs
        flags = "".join(f" {flag}" for flag in ("start", "end") if getattr(request, flag))
        self._tally.check(
            "replay",
            same,
            f"a retry of the chunk at {request.offset}{flags} of session {s.session_id}: replayed "
            f"{again.replayed}, steps {again.steps} (first {first.steps}), ended {again.ended}, outputs "
            f"{'the same' if again.outputs == first.outputs else 'different'}",
        )
        return same

    async def _reconnect(self, s: _Session, rng: np.random.Generator) -> bool:
        """Drop the session's own connection (the shared one stays, for its other sessions) and go on over a
        new one at the same offset."""
        if s.own is not None:
            await s.own.close()
        s.own = AsyncConveyorClient(self._target, CLIENT_OPTIONS)
        self._tally.count("reconnect")
        if rng.random() < P_RETRY_AFTER_RECONNECT:
            return await self._retry(s, rng)
        return True

    async def _idle(self, s: _Session, rng: np.random.Generator) -> bool:
        self._tally.count("idle")
        await asyncio.sleep(rng.uniform(*IDLE_SHARE) * min(self._info.idle_ttl_s, MAX_IDLE_S))
        return True

    async def _send_bad(self, s: _Session, rng: np.random.Generator) -> bool:
        await self._bad(s, rng, self._next_bad())
        return True  # the session goes on: a bad request must have left it as it was

    async def _bad(self, s: _Session, rng: np.random.Generator, case: BadCase) -> None:
        request = case.build(Spot(s.session_id, s.offset, self._info, lambda steps: self._inputs(rng, steps)))
        self._tally.count("bad")
        call: Awaitable[object] = (
            s.client.end_session(request.session_id) if case.rpc == "end" else self._send(s, request, rng)
        )
        await self._ask(f"bad: {case.name}", call, case.code)

    async def _finish(self, s: _Session, rng: np.random.Generator, ending: str) -> None:
        if ending == "EndSession":
            steps = await self._ask("end", s.client.end_session(s.session_id))
            if steps is None:
                return
            self._tally.check("answer", steps == s.offset, f"EndSession said {steps} steps, not {s.offset}")
        self._tally.count(ending)
        if ending != "expiry" and rng.random() < P_AFTER_END:
            if ending == "end flag" and rng.random() < 0.5:
                await self._retry(s, rng)  # the chunk that ended the session: still answered, as a replay
            else:
                await self._bad(s, rng, AFTER_END)
        await self._check_outputs(s)
        if ending == "expiry":
            await asyncio.sleep(self._info.idle_ttl_s + EXPIRY_MARGIN_S)
            request = pb.ChunkRequest(
                session_id=s.session_id, inputs=encode(self._inputs(rng, 1)), offset=s.offset
            )
            await self._ask("after expiry", self._send(s, request, rng), "NOT_FOUND")

    async def _check_outputs(self, s: _Session) -> None:
        """The session's outputs, chunk by chunk, against a fresh session fed its whole sequence at once."""
        whole = np.concatenate(s.inputs)
        request = pb.ChunkRequest(
            session_id=f"check-{uuid.uuid4().hex}", inputs=encode(whole), start=True, end=True
        )
        response = await self._ask("check", s.shared.step(request))
        if response is None:
            return
        expected = decode(response.outputs)[np.concatenate(s.rows)]
        scaled = np.abs(np.concatenate(s.outputs) - expected) / np.maximum(1.0, np.abs(expected))
        diff = float(scaled.max())
        self._tally.max_diff = max(self._tally.max_diff, diff)
        self._tally.check(
            "outputs", diff <= TOLERANCE, f"session {s.session_id}: {diff:.2e} off its one-chunk run"
        )

    def _send(
        self, s: _Session, request: pb.ChunkRequest, rng: np.random.Generator
    ) -> Awaitable[pb.ChunkResponse]:
        draw = rng.random()
        if draw < P_STEP:
            self._tally.count("via Step")
            return s.client.step(request)
        if draw < P_STEP + P_FRAME:
            self._tally.count("via Frames")
            return s.client.frame_chunk(request)
        self._tally.count("via Stream")
        return s.client.stream_chunk(request)

    async def _ask(self, kind: str, call: Awaitable[T], expected: str = OK) -> T | None:
        """Await `call` and tally its answer; the answer when it succeeded as it was due to, else None."""
        try:
            answer: T | None = await call
            code, message = OK, ""
        except ConveyorError as exc:
            answer, code, message = None, exc.code.name, exc.message
        self._tally.answer(kind, code, expected, message)
        return answer if code == expected == OK else None

    def _inputs(self, rng: np.random.Generator, steps: int) -> np.ndarray:
        size = self._info.input_size
        if self._info.takes_tokens:
            return rng.integers(0, size, steps, dtype=np.int64)
        return rng.standard_normal((steps, size), dtype=np.float32)


def _problem(
    request: pb.ChunkRequest, response: pb.ChunkResponse, steps: int, output_size: int
) -> str | None:
    """What is wrong with a fresh chunk's answer, or None."""
    rows = 1 if request.outputs == pb.OUTPUT_MODE_LAST else steps
    due: dict[str, object] = {
        "offset": request.offset,
        "steps": request.offset + steps,
        "ended": request.end,
        "replayed": False,
        "shape": [rows, output_size],
        "session": request.session_id or response.session_id or "(an issued id)",
    }
    got: dict[str, object] = {
        "offset": response.offset,
        "steps": response.steps,
        "ended": response.ended,
        "replayed": response.replayed,
        "shape": list(response.outputs.shape),
        "session": response.session_id,
    }
    wrong = [f"{name} {got[name]} (due {value})" for name, value in due.items() if got[name] != value]
    return "; ".join(wrong) or None
