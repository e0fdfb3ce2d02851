"""Packing many sessions' chunks into the columnar frames of the Frames RPC, and splitting the results.

Gateway code submits chunks of many sessions as they come (one `submit` per chunk, from as many tasks as it
likes); what is submitted in one event-loop pass leaves at the end of that pass as one frame per chunk shape
and output mode, each session at most once per frame. Nothing waits for a frame to fill: no delay is added.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from serving.client.core import ConveyorError
from serving.wire import pb
from serving.wire.tensors import TensorDecodeError, decode, encode

SendFrame = Callable[[pb.Frame], Awaitable[pb.FrameResult]]
_Queued = tuple[pb.ChunkRequest, "asyncio.Future[pb.ChunkResponse]"]


class FramePacker:
    """Turns chunk requests into frames sent with `send`, and each frame's result into chunk responses."""

    def __init__(self, send: SendFrame) -> None:
        self._send = send
        self._queued: list[_Queued] = []
        self._frame_ids = itertools.count()
        self._sending: set[asyncio.Task[None]] = set()

    def submit(self, request: pb.ChunkRequest) -> asyncio.Future[pb.ChunkResponse]:
        """Queue one chunk for the frame leaving at the end of this loop pass; resolves to its response, or
        fails with its session's ConveyorError (or the frame's, when the frame as a whole failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ChunkResponse] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((request, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for group in _frames(queued):
            task = asyncio.get_running_loop().create_task(self._exchange(group))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _exchange(self, group: list[_Queued]) -> None:
        frame = pack([request for request, _ in group], str(next(self._frame_ids)))
        try:
            result = await self._send(frame)
        except ConveyorError as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(group, unpack(frame, result), strict=True):
            if future.done():
                continue  # its sender gave up
            if isinstance(answer, ConveyorError):
                future.set_exception(answer)
            else:
                future.set_result(answer)


def _frames(queued: list[_Queued]) -> list[list[_Queued]]:
    """Groups of chunks that can share a frame: one shape, dtype, output mode, model and version (a session
    names the version it began on; every session of a frame runs on one), each session once. A chunk
    whose tensor does not parse goes alone: in a frame, it would make the whole frame's tensor unreadable and
    fail its neighbours with it."""
    groups: dict[tuple[object, ...], list[list[_Queued]]] = {}
    alone: list[list[_Queued]] = []
    for item in queued:
        request = item[0]
        if not _parses(request.inputs):
            alone.append([item])  # the server answers its error, for it alone
            continue
        key = (
            tuple(request.inputs.shape),
            request.inputs.dtype,
            request.outputs,
            request.model,
            request.model_version,
        )
        frames = groups.setdefault(key, [[]])
        taken = {queued_request.session_id for queued_request, _ in frames[-1]}
        if request.session_id and request.session_id in taken:
            frames.append([])  # a session's next chunk waits for the next frame
        frames[-1].append(item)
    return [frame for frames in groups.values() for frame in frames] + alone


def _parses(tensor: pb.Tensor) -> bool:
    try:
        decode(tensor)
    except TensorDecodeError:
        return False
    return True


def pack(requests: list[pb.ChunkRequest], frame_id: str) -> pb.Frame:
    """One frame of `requests` (same shape, dtype, output mode, model and version; distinct sessions)."""
    first = requests[0].inputs
    frame = pb.Frame(
        frame_id=frame_id,
        session_ids=[request.session_id for request in requests],
        offsets=[request.offset for request in requests],
        start=[request.start for request in requests],
        end=[request.end for request in requests],
        reset=[request.reset for request in requests],
        outputs=requests[0].outputs,
        snapshots=[request.snapshot for request in requests],
        model=requests[0].model,
        model_version=requests[0].model_version,
    )
    frame.inputs.dtype = first.dtype
    frame.inputs.shape[:] = [len(requests), *first.shape]
    frame.inputs.data = b"".join(request.inputs.data for request in requests)
    return frame


def join_parts(parts: list[pb.FrameResult]) -> pb.FrameResult:
    """One FrameResult of a frame's parts (consecutive sessions each, in order), as if it had come whole."""
    parts = sorted(parts, key=lambda part: part.first_index)
    joined = pb.FrameResult(frame_id=parts[0].frame_id, model_version=parts[0].model_version)
    for part in parts:
        joined.session_ids.extend(part.session_ids)
        joined.steps.extend(part.steps)
        joined.ended.extend(part.ended)
        joined.replayed.extend(part.replayed)
        joined.errors.extend(part.errors)
        joined.output_steps.extend(part.output_steps)
    joined.outputs.dtype = parts[0].outputs.dtype
    joined.outputs.shape[:] = [len(joined.session_ids), *parts[0].outputs.shape[1:]]
    joined.outputs.data = b"".join(part.outputs.data for part in parts)
    return joined


def unpack(frame: pb.Frame, result: pb.FrameResult) -> list[pb.ChunkResponse | ConveyorError]:
    """Each session's response, or its error, in the frame's order."""
    outputs = decode(result.outputs)
    errors = {error.index: error for error in result.errors}
    answers: list[pb.ChunkResponse | ConveyorError] = []
    for index, session_id in enumerate(result.session_ids):
        error = errors.get(index)
        if error is not None:
            answers.append(
                ConveyorError.from_chunk_error(pb.ChunkError(code=error.code, message=error.message))
            )
            continue
        answers.append(
            pb.ChunkResponse(
                session_id=session_id,
                offset=frame.offsets[index],
                steps=result.steps[index],
                outputs=encode(np.ascontiguousarray(_own(outputs, result.output_steps, index))),
                ended=result.ended[index],
                replayed=result.replayed[index],
                model=frame.model,
                model_version=result.model_version,
            )
        )
    return answers


def _own(outputs: np.ndarray, output_steps: Sequence[int], index: int) -> np.ndarray:
    """Session `index`'s outputs, without the zero rows after its windows (a framed model's frame)."""
    return outputs[index, : output_steps[index]] if output_steps else outputs[index]
