"""The session contract as a stateful property: random interleavings of start, chunk, retry, stale offsets,
reset, end, snapshot and restore across sessions (some chunks of several sessions at once), held against a
reference model of the contract. No step is ever applied twice or lost: every answer equals the reference,
which runs each session's whole sequence from zero state."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from fakes import FAKE_SPEC, FAKE_VOCABULARY, FakeRunner
from fuzzing import fuzz_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serving.domain.batcher import Batcher
from serving.domain.chunks import Chunk, ServedModel
from serving.domain.engine import Engine
from serving.domain.errors import OffsetMismatchError, SessionAlreadyExistsError, SessionNotFoundError
from serving.domain.sessions.lifecycle import SessionLimits, Sessions
from serving.domain.sessions.memory import InMemorySessionStore

pytestmark = pytest.mark.timeout(300)

SESSION_IDS = st.sampled_from([f"s{i}" for i in range(4)])
PIECES = st.lists(st.integers(0, FAKE_VOCABULARY - 1), min_size=1, max_size=5)


class Quiet:
    """Metrics that go nowhere."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def _reference(tokens: list[int]) -> np.ndarray:
    """Every timestep's outputs of `tokens` run whole from zero state."""
    zeros = np.zeros((1, FAKE_SPEC.state_size), np.float32)
    return np.asarray(FakeRunner().run(np.array(tokens, np.int64)[None], zeros)[0][0])


class SessionContract(RuleBasedStateMachine):
    """The engine over the in-memory store and a fake runner, beside a model: session -> tokens applied."""

    @initialize()
    def open_engine(self) -> None:
        self.loop = asyncio.new_event_loop()
        model = ServedModel(FAKE_SPEC, 16, 600.0)
        sessions = Sessions(InMemorySessionStore(model.state_shape), SessionLimits(600, 3600, 100, False))
        self.batcher = Batcher(
            FakeRunner(), max_batch_size=8, max_delay_ms=0, inline_max_ms=0.5, metrics=Quiet()
        )
        self.engine = Engine(model, sessions, self.batcher, Quiet())
        self.applied: dict[str, list[int]] = {}  # the reference model: what each live session has consumed
        self.last: dict[str, tuple[Chunk, np.ndarray]] = {}  # each session's last applied chunk and answer

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            self.loop.run_until_complete(self.engine.close(grace_s=1))
            self.batcher.close()
            self.loop.close()

    def _step(self, chunk: Chunk) -> Any:
        return self.loop.run_until_complete(self.engine.step(chunk))

    def _expect(self, session_id: str, tokens: list[int], outputs: np.ndarray) -> None:
        before = len(self.applied[session_id]) - len(tokens)
        np.testing.assert_array_equal(outputs, _reference(self.applied[session_id])[before:])

    @rule(session_id=SESSION_IDS, tokens=PIECES)
    def start(self, session_id: str, tokens: list[int]) -> None:
        chunk = Chunk(session_id, np.array(tokens, np.int64), 0, start=True)
        if session_id in self.applied:
            last = self.last[session_id][0]
            repeat = last.start and not (last.reset or last.snapshot) and last.offset == 0
            if repeat and np.array_equal(last.inputs, chunk.inputs):
                assert self._step(chunk).replayed  # the start itself, retried: answered again
                return
            with pytest.raises(SessionAlreadyExistsError):
                self._step(chunk)
            return
        result = self._step(chunk)
        self.applied[session_id] = list(tokens)
        self.last[session_id] = (chunk, result.outputs)
        self._expect(session_id, tokens, result.outputs)

    @precondition(lambda self: self.applied)
    @rule(data=st.data(), tokens=PIECES)
    def next_chunk(self, data: st.DataObject, tokens: list[int]) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.applied)))
        chunk = Chunk(session_id, np.array(tokens, np.int64), len(self.applied[session_id]))
        result = self._step(chunk)
        self.applied[session_id] += tokens
        self.last[session_id] = (chunk, result.outputs)
        self._expect(session_id, tokens, result.outputs)
        assert result.steps == len(self.applied[session_id])

    @precondition(lambda self: self.last)
    @rule(data=st.data())
    def retry_last(self, data: st.DataObject) -> None:
        """A retry after a lost answer: the same chunk at the same offset is answered again, not applied."""
        session_id = data.draw(st.sampled_from(sorted(self.last)))
        chunk, answer = self.last[session_id]
        result = self._step(chunk)
        assert result.replayed and result.steps == len(self.applied[session_id])
        np.testing.assert_array_equal(result.outputs, answer)

    @precondition(lambda self: self.applied)
    @rule(data=st.data(), shift=st.sampled_from([-3, -1, 1, 7]))
    def stale_offset(self, data: st.DataObject, shift: int) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.applied)))
        offset = len(self.applied[session_id]) + shift
        if offset < 0 or (self.last[session_id][0].offset == offset):
            return
        with pytest.raises(OffsetMismatchError, match=f"consumed {len(self.applied[session_id])} steps"):
            self._step(Chunk(session_id, np.array([1], np.int64), offset))

    @precondition(lambda self: self.applied)
    @rule(data=st.data(), tokens=PIECES)
    def reset(self, data: st.DataObject, tokens: list[int]) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.applied)))
        chunk = Chunk(session_id, np.array(tokens, np.int64), 0, start=True, reset=True)
        result = self._step(chunk)
        self.applied[session_id] = list(tokens)
        self.last[session_id] = (chunk, result.outputs)
        self._expect(session_id, tokens, result.outputs)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.applied)))
        steps = self.loop.run_until_complete(self.engine.end_session(session_id))
        assert steps == len(self.applied.pop(session_id))
        del self.last[session_id]
        with pytest.raises(SessionNotFoundError):
            self._step(Chunk(session_id, np.array([1], np.int64), steps))

    @precondition(lambda self: self.applied)
    @rule(data=st.data(), new_id=SESSION_IDS, tokens=PIECES)
    def snapshot_and_restore(self, data: st.DataObject, new_id: str, tokens: list[int]) -> None:
        """A session's snapshot, restored under a free id, goes on exactly where the original stood."""
        session_id = data.draw(st.sampled_from(sorted(self.applied)))
        if new_id in self.applied:
            return
        blob, steps = self.loop.run_until_complete(self.engine.snapshot(session_id))
        chunk = Chunk(new_id, np.array(tokens, np.int64), steps, start=True, snapshot=blob)
        result = self._step(chunk)
        self.applied[new_id] = self.applied[session_id] + tokens
        self.last[new_id] = (chunk, result.outputs)
        self._expect(new_id, tokens, result.outputs)

    @precondition(lambda self: len(self.applied) >= 2)
    @rule(pieces=st.lists(PIECES, min_size=2, max_size=4))
    def chunks_of_several_sessions_at_once(self, pieces: list[list[int]]) -> None:
        """Chunks of different sessions in flight together (batched together when their lengths match)."""
        chosen = sorted(self.applied)[: len(pieces)]
        chunks = [
            Chunk(s, np.array(t, np.int64), len(self.applied[s]))
            for s, t in zip(chosen, pieces, strict=False)
        ]

        async def together() -> list[Any]:
            answers: list[Any] = await asyncio.gather(*(self.engine.step(c) for c in chunks))
            return answers

        results = self.loop.run_until_complete(together())
        for chunk, result in zip(chunks, results, strict=True):
            tokens = chunk.inputs.tolist()
            self.applied[chunk.session_id] += tokens
            self.last[chunk.session_id] = (chunk, result.outputs)
            self._expect(chunk.session_id, tokens, result.outputs)

    @invariant()
    def live_sessions_are_the_models(self) -> None:
        if hasattr(self, "engine"):
            assert len(self.engine._sessions) == len(self.applied)


SessionContract.TestCase.settings = fuzz_settings(150, stateful_step_count=40)
test_the_session_contract_holds_under_random_interleavings = SessionContract.TestCase
