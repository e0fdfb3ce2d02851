"""The client library against a real server on free ports, checked against ONNX Runtime run offline."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from serving_harness import card, offline
from serving_harness import sequence as valid_inputs

from serving.client import ClientOptions, ConveyorClient, ConveyorError, Outputs, RetryPolicy
from serving.client.aio import AsyncConveyorClient, Via
from serving.client.calls import BidiCall
from serving.wire import pb, pb_grpc
from serving.wire.tensors import decode, encode

pytestmark = pytest.mark.timeout(60)
ATOL = 1e-5
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
FAST_RETRY = ClientOptions(timeout_s=5.0, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01))


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 40, size=n).astype(np.int64)


def chunked(sequence: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(sequence)
    return [sequence[a:b] for a, b in itertools.pairwise(bounds)]


def test_model_info_and_health(token_target: str, token_artifact: Path) -> None:
    expected = card(token_artifact)
    with ConveyorClient(token_target) as client:
        client.wait_for_ready(timeout_s=5)
        info = client.model_info()
    assert info.takes_tokens and info.fingerprint == expected["onnx_sha256"]
    assert list(info.vocabulary) == expected["vocabulary"]
    assert (info.layers, info.hidden) == (expected["layers"], expected["hidden"])


def test_sync_session_matches_offline_run(token_target: str, token_artifact: Path) -> None:
    sequence = tokens(16)
    with ConveyorClient(token_target) as client, client.session() as session:
        outputs = [session.send(chunk) for chunk in chunked(sequence, [3, 5, 1, 7])]
        assert session.session_id and session.offset == 16
    np.testing.assert_allclose(np.concatenate(outputs), offline(token_artifact, sequence), atol=ATOL)


def test_sync_feature_session_with_last_outputs(feature_target: str, feature_artifact: Path) -> None:
    x = valid_inputs(feature_artifact, 12)
    with ConveyorClient(feature_target) as client, client.session(outputs=Outputs.LAST) as session:
        lasts = [session.send(chunk)[-1] for chunk in chunked(x, [4, 6, 2])]
    np.testing.assert_allclose(lasts, offline(feature_artifact, x)[[3, 9, 11]], atol=ATOL)


def test_async_sessions_share_one_stream(token_target: str, token_artifact: Path) -> None:
    sequences = [tokens(20, seed) for seed in range(4)]
    plans = [[20], [1] * 20, [7, 6, 7], [2, 18]]

    async def run(
        sequence: np.ndarray, sizes: list[int], client: AsyncConveyorClient, via: Any
    ) -> np.ndarray:
        async with client.session(via=via) as session:
            return np.concatenate([await session.send(chunk) for chunk in chunked(sequence, sizes)])

    async def main() -> list[np.ndarray]:
        async with AsyncConveyorClient(token_target) as client:
            await client.wait_for_ready(timeout_s=5)
            vias: list[Via] = ["stream", "stream", "stream", "step"]
            return await asyncio.gather(*map(run, sequences, plans, [client] * 4, vias))

    for sequence, outputs in zip(sequences, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(outputs, offline(token_artifact, sequence), atol=ATOL)


def test_repeated_chunk_is_applied_once(token_target: str, token_artifact: Path) -> None:
    sequence = tokens(9)
    first, second, third = chunked(sequence, [3, 3, 3])
    with grpc.insecure_channel(token_target) as channel:
        stub = pb_grpc.ConveyorStub(channel)
        started = stub.Step(pb.ChunkRequest(inputs=encode(first), start=True))
        again = pb.ChunkRequest(session_id=started.session_id, inputs=encode(second), offset=3)
        applied, replayed = stub.Step(again), stub.Step(again)
        last = stub.Step(pb.ChunkRequest(session_id=started.session_id, inputs=encode(third), offset=6))
    assert (applied.replayed, replayed.replayed, replayed.steps, last.steps) == (False, True, 6, 9)
    np.testing.assert_array_equal(decode(replayed.outputs), decode(applied.outputs))
    np.testing.assert_allclose(decode(last.outputs), offline(token_artifact, sequence)[6:], atol=ATOL)


class LostResponse(grpc.RpcError):  # type: ignore[misc]
    """What grpc raises when the connection drops after the server has applied the chunk."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (simulated)"


class LosesOneResponse:
    """A stub whose Step delivers every chunk to the server but loses the response of call number `lost`."""

    def __init__(self, stub: Any, lost: int) -> None:
        self._stub = stub
        self._lost = lost
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Step(self, request: pb.ChunkRequest, **kwargs: Any) -> pb.ChunkResponse:  # noqa: N802 (grpc's name)
        self.calls += 1
        response: pb.ChunkResponse = self._stub.Step(request, **kwargs)
        if self.calls == self._lost:
            raise LostResponse()
        return response


@pytest.mark.parametrize("lost", [1, 2], ids=["start", "middle"])
def test_sync_retry_after_lost_response_is_exactly_once(
    token_target: str, token_artifact: Path, lost: int
) -> None:
    sequence = tokens(12)
    with ConveyorClient(token_target, FAST_RETRY) as client:
        lossy = LosesOneResponse(client._stub, lost)
        client._stub = lossy  # type: ignore[assignment]
        with client.session(f"lossy-{lost}") as session:
            outputs = [session.send(chunk) for chunk in chunked(sequence, [4, 4, 4])]
    assert lossy.calls == 4  # the chunk whose response was lost went twice, and was applied once
    np.testing.assert_allclose(np.concatenate(outputs), offline(token_artifact, sequence), atol=ATOL)


def test_async_retry_after_broken_stream(
    token_target: str, token_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequence = tokens(12)
    real_send = BidiCall.send
    sends = 0

    async def breaks_after_second_chunk(self: BidiCall[Any, Any], request: Any, timeout_s: float) -> Any:
        nonlocal sends
        sends += 1
        response = await real_send(self, request, timeout_s)
        if sends == 2:
            self._call.cancel()  # the connection drops after the server applied the chunk
            raise ConveyorError(grpc.StatusCode.UNAVAILABLE, "stream broken (simulated)")
        return response

    monkeypatch.setattr(BidiCall, "send", breaks_after_second_chunk)

    async def main() -> np.ndarray:
        async with AsyncConveyorClient(token_target, FAST_RETRY) as client, client.session() as session:
            return np.concatenate([await session.send(chunk) for chunk in chunked(sequence, [4, 4, 4])])

    outputs = asyncio.run(main())
    assert sends == 4
    np.testing.assert_allclose(outputs, offline(token_artifact, sequence), atol=ATOL)


def test_error_codes(token_target: str) -> None:
    with ConveyorClient(token_target, FAST_RETRY) as client:
        with pytest.raises(ConveyorError) as never_started:
            client.attach("never-started", 0).send(tokens(2))
        with client.session("taken") as session:
            session.send(tokens(3))
            with pytest.raises(ConveyorError) as taken:
                client.session("taken").send(tokens(1))
            with pytest.raises(ConveyorError) as wrong_offset:
                client.attach("taken", 1).send(tokens(1))
            with pytest.raises(ConveyorError) as wrong_dtype:
                session.send(np.zeros((2, 3), np.float32))
            assert session.send(tokens(1)).shape[0] == 1  # a failed chunk left the session as it was
    assert never_started.value.code == grpc.StatusCode.NOT_FOUND
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert wrong_offset.value.code == grpc.StatusCode.ABORTED and "3" in wrong_offset.value.message
    assert wrong_dtype.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_in_band_error_keeps_the_stream_open(token_target: str) -> None:
    async def main() -> tuple[ConveyorError, int]:
        async with AsyncConveyorClient(token_target, FAST_RETRY) as client:
            with pytest.raises(ConveyorError) as missing:
                await client.attach("nobody", 5).send(tokens(2))
            async with client.session() as session:
                await session.send(tokens(3))
                return missing.value, session.offset

    error, offset = asyncio.run(main())
    assert error.code == grpc.StatusCode.NOT_FOUND and offset == 3


def test_stream_is_told_when_its_session_ends(token_target: str) -> None:
    async def main() -> str | None:
        async with AsyncConveyorClient(token_target) as client:
            session = client.session()
            await session.send(tokens(2))
            await client.end_session(session.session_id or "")  # another call, not the stream
            for _ in range(100):
                if session.end_reason is not None:
                    break
                await asyncio.sleep(0.01)
            return session.end_reason

    assert asyncio.run(main()) == "end"


def test_snapshot_restores_state(token_target: str, feature_target: str, token_artifact: Path) -> None:
    sequence = tokens(10)
    with ConveyorClient(token_target) as client:
        with client.session() as original:
            original.send(sequence[:6])
            snapshot = original.snapshot()
        with client.restore(snapshot) as restored:
            rest = restored.send(sequence[6:])
    assert snapshot.steps == 6
    np.testing.assert_allclose(rest, offline(token_artifact, sequence)[6:], atol=ATOL)
    with ConveyorClient(feature_target) as other, pytest.raises(ConveyorError) as wrong_model:
        other.restore(snapshot).send(np.zeros((1, 6), np.float32))
    assert wrong_model.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_leaving_the_with_block_ends_the_session(token_target: str) -> None:
    with ConveyorClient(token_target) as client:
        with client.session() as session:
            session.send(tokens(2))
        with pytest.raises(ConveyorError) as gone:
            client.attach(session.session_id or "", 2).send(tokens(1))
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_unreachable_server() -> None:
    target = UNREACHABLE
    with ConveyorClient(target, FAST_RETRY) as client:
        with pytest.raises(ConveyorError) as not_ready:
            client.wait_for_ready(timeout_s=0.3)
        with pytest.raises(ConveyorError) as unavailable:
            client.session().send(tokens(1))
    assert not_ready.value.code == unavailable.value.code == grpc.StatusCode.UNAVAILABLE
    assert target in not_ready.value.message
