"""The load process: drives one cell against a server (or ONNX Runtime alone) and reports what it measured.

The parent runs `python -m serving.bench.load JOB_JSON` and reads its stdout: `start` when the measured window
opens, `stop` when it closes (the parent reads the server's CPU time at each), then one JSON line of results.
Raw generated stubs on purpose: the figure should measure the server, not a client library.

Each session keeps one chunk in flight (a closed loop): its next chunk leaves when its response arrives, so
`sessions` is the concurrency. Sessions are spread over `channels` connections, one Stream call each
(one_stream: every session multiplexed on one; frames: one Frames call, the sessions in `FRAMES_IN_FLIGHT`
frames that take turns).
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from serving.bench.grid import BenchError, Cell
from serving.bench.wire import CHANNEL_OPTIONS, Job, inputs_maker, say, stub
from serving.wire import pb, pb_grpc

_Message = TypeVar("_Message", pb.ChunkRequest, pb.Frame)
FRAMES_IN_FLIGHT = 2  # frames mode: the server computes one frame while the other travels


@dataclass
class _Window:
    """Counts chunks and keeps latencies of the responses that arrive while it is open."""

    latencies_s: list[float] = field(default_factory=list)
    chunks: int = 0
    steps: int = 0
    is_open: bool = False
    opened_s: float = 0.0
    closed_s: float = 0.0

    def record(self, latency_s: float, steps: int, chunks: int = 1) -> None:
        if self.is_open:
            self.latencies_s.append(latency_s)
            self.chunks += chunks
            self.steps += steps

    def open(self) -> None:
        self.opened_s, self.is_open = time.perf_counter(), True
        say("start")

    def close(self) -> None:
        self.closed_s, self.is_open = time.perf_counter(), False
        say("stop")

    def result(self, cpu_s: float, **extra: Any) -> Job:
        millis = np.percentile(self.latencies_s, (50, 99)) * 1000 if self.latencies_s else (np.nan, np.nan)
        seconds = self.closed_s - self.opened_s
        summary = {"chunks": self.chunks, "steps": self.steps, "seconds": seconds, "cpu_s": cpu_s}
        return {**summary, "p50_ms": float(millis[0]), "p99_ms": float(millis[1]), **extra}


class _Feed:
    """One session's requests. Stateful: one session, offsets advancing, after an optional history prefix.
    Stateless: every call a fresh session (start + end) carrying the whole history, one new step credited."""

    def __init__(self, key: str, cell: Cell, inputs: Callable[[int], pb.Tensor]) -> None:
        self.key = key
        self.sent_s = 0.0
        self.credit = 0  # steps the pending response is worth
        self._stateless = cell.mode == "stateless"
        self._calls = 0
        self._offset = 0
        self._chunk = inputs(cell.chunk_steps)
        self._first = inputs(cell.history_steps) if cell.history_steps else self._chunk
        self._steps = cell.chunk_steps

    def next(self) -> pb.ChunkRequest:
        self._calls += 1
        self.sent_s = time.perf_counter()
        if self._stateless:
            self.credit = self._steps
            return pb.ChunkRequest(
                session_id=f"{self.key}.{self._calls}",
                inputs=self._first,
                start=True,
                end=True,
                outputs=pb.OUTPUT_MODE_LAST,
                request_id=self.key,
            )
        inputs = self._first if self._calls == 1 else self._chunk
        request = pb.ChunkRequest(
            session_id=self.key,
            inputs=inputs,
            offset=self._offset,
            start=self._calls == 1,
            request_id=self.key,
        )
        self.credit = inputs.shape[0]
        self._offset += self.credit
        return request


async def _drive(service: pb_grpc.ConveyorAsyncStub, feeds: list[_Feed], window: _Window) -> None:
    # Several sessions on the stream: requests go out through grpc's own writer task, so reading a response
    # never waits for the previous write to finish, as in a client with a reader thread (awaiting each write
    # before the next read kept all but 6-8 of 64 sessions on one stream out of the server, waiting here).
    # One session has nothing to overlap: a direct write spares it a hop through that task.
    loop = asyncio.get_running_loop()
    requests: _Requests[pb.ChunkRequest] | None = _Requests(loop) if len(feeds) > 1 else None
    call = service.Stream(requests)
    for feed in feeds:
        await _send(call, requests, feed.next())
    by_key = {feed.key: feed for feed in feeds}
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise BenchError("the server ended a stream while the bench was driving it")
        kind = response.WhichOneof("kind")
        if kind == "chunk":
            feed = by_key[response.chunk.request_id]
            window.record(time.perf_counter() - feed.sent_s, feed.credit)
            await _send(call, requests, feed.next())
        elif kind == "error":
            raise BenchError(f"the server refused a chunk: {response.error.message}")


async def _send(
    call: grpc.aio.StreamStreamCall, requests: _Requests[pb.ChunkRequest] | None, request: pb.ChunkRequest
) -> None:
    if requests is None:
        await call.write(request)
    else:
        requests.put(request)


class _Requests(Generic[_Message]):
    """One Stream (or Frames) call's requests, as the async iterator grpc writes from (a deque and one
    future: cheaper than an asyncio.Queue)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: collections.deque[_Message] = collections.deque()
        self._loop = loop
        self._ready: asyncio.Future[None] | None = None

    def put(self, request: _Message) -> None:
        self._queue.append(request)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def __aiter__(self) -> AsyncIterator[_Message]:
        while True:
            while not self._queue:
                self._ready = self._loop.create_future()
                await self._ready
            yield self._queue.popleft()


class _FrameFeed:
    """A group of sessions that travel together: one frame per round, every session's chunk in it."""

    def __init__(self, key: str, sessions: int, cell: Cell, inputs: Callable[[int], pb.Tensor]) -> None:
        self.key = key
        self.sent_s = 0.0
        self.sessions = sessions
        self.steps = cell.chunk_steps
        chunk = inputs(sessions * cell.chunk_steps)  # [sessions * time, ...]: reshaped to the frame's shape
        self._frame = pb.Frame(frame_id=key, session_ids=[f"{key}.{i}" for i in range(sessions)])
        self._frame.inputs.CopyFrom(chunk)
        self._frame.inputs.shape[:] = [sessions, cell.chunk_steps, *chunk.shape[1:]]
        self._frame.start[:] = [True] * sessions
        self._offset = 0

    def next(self) -> pb.Frame:
        self.sent_s = time.perf_counter()
        if self._offset:
            del self._frame.start[:]
            self._frame.offsets[:] = [self._offset] * self.sessions
        self._offset += self.steps
        return self._frame


async def _drive_frames(service: pb_grpc.ConveyorAsyncStub, feeds: list[_FrameFeed], window: _Window) -> None:
    requests: _Requests[pb.Frame] = _Requests(asyncio.get_running_loop())
    call = service.Frames(requests)
    for feed in feeds:
        requests.put(feed.next())
    by_key = {feed.key: feed for feed in feeds}
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise BenchError("the server ended a Frames stream while the bench was driving it")
        kind = response.WhichOneof("kind")
        if kind == "result":
            if response.result.errors:
                raise BenchError(f"the server refused a frame's chunk: {response.result.errors[0].message}")
            feed = by_key[response.result.frame_id]
            window.record(time.perf_counter() - feed.sent_s, feed.sessions * feed.steps, feed.sessions)
            requests.put(feed.next())
        elif kind == "error":
            raise BenchError(f"the server refused a frame: {response.error.message}")


def _drivers(
    cell: Cell, channels: list[grpc.aio.Channel], make: Callable[[int], pb.Tensor], window: _Window
) -> list[asyncio.Task[None]]:
    prefix = uuid.uuid4().hex[:8]
    if cell.mode == "frames":
        groups = min(FRAMES_IN_FLIGHT, cell.sessions)
        sizes = [len(range(i, cell.sessions, groups)) for i in range(groups)]
        frames = [_FrameFeed(f"{prefix}-{i}", size, cell, make) for i, size in enumerate(sizes)]
        return [asyncio.create_task(_drive_frames(stub(channels[0]), frames, window))]
    feeds = [_Feed(f"{prefix}-{i}", cell, make) for i in range(cell.sessions)]
    return [
        asyncio.create_task(_drive(stub(channel), feeds[i :: len(channels)], window))
        for i, channel in enumerate(channels)
    ]


async def _measure_server(job: Job) -> Job:
    cell = Cell(**job["cell"])
    channels = [
        grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) for _ in range(cell.channels)
    ]
    try:
        info = await stub(channels[0]).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        make = inputs_maker(info, np.random.default_rng(job.get("seed", 0)))
        window = _Window()
        drivers = _drivers(cell, channels, make, window)
        return await _run_window(drivers, window, job["warmup_s"], job["seconds"])
    finally:
        for channel in channels:
            await channel.close()


async def _run_window(
    drivers: list[asyncio.Task[None]], window: _Window, warmup_s: float, seconds: float
) -> Job:
    try:
        _raise_failed(await asyncio.wait(drivers, timeout=warmup_s, return_when=asyncio.FIRST_COMPLETED))
        cpu_s = time.process_time()
        window.open()
        done = await asyncio.wait(drivers, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        window.close()
        _raise_failed(done)
        return window.result(time.process_time() - cpu_s)
    finally:
        for driver in drivers:
            driver.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)


def _raise_failed(waited: tuple[set[asyncio.Task[None]], set[asyncio.Task[None]]]) -> None:
    for task in waited[0]:
        task.result()  # a driver only ends by failing: raise its error


def _measure_floor(job: Job) -> Job:
    from modelcard.graph import random_inputs
    from serving.server.onnx_runner import OnnxStepRunner

    cell = Cell(**job["cell"])
    runner = OnnxStepRunner.load(Path(job["model_dir"]), intra_op_threads=job["ort_threads"])
    spec = runner.spec
    batch = cell.sessions  # what one frame of every session runs (the batched server splits it at its max)
    x = random_inputs(spec, batch, cell.chunk_steps, np.random.default_rng(job.get("seed", 0)))
    states = [np.zeros((batch, spec.state_size), np.float32)]

    def step() -> None:  # the server's runner call: the state rows unpacked, ORT run, packed back
        _, states[0] = runner.run(x, states[0])

    window = _Window()
    _repeat(step, job["warmup_s"], window, batch, cell.chunk_steps)  # closed window: nothing counted
    cpu_s = time.process_time()
    window.open()
    _repeat(step, job["seconds"], window, batch, cell.chunk_steps)
    window.close()
    return window.result(time.process_time() - cpu_s, batch=batch)


def _repeat(step: Callable[[], None], seconds: float, window: _Window, batch: int, steps: int) -> None:
    deadline = time.perf_counter() + seconds
    while (started := time.perf_counter()) < deadline:
        step()
        window.record(time.perf_counter() - started, batch * steps, chunks=batch)


def run_load(job: Job, on_start: Callable[[], None], on_stop: Callable[[], None]) -> Job:
    """Run `job` in a load process; `on_start`/`on_stop` run as its measured window opens and closes.

    The load process's stdin closes once `on_start` has returned: a job that holds something open while the
    parent measures (idle sessions) waits for that.
    """
    argv = [sys.executable, "-m", "serving.bench.load", json.dumps(job)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdin is not None and process.stdout is not None
        result: Job | None = None
        for line in process.stdout:
            if line == "start\n":
                on_start()
                process.stdin.close()
            elif line == "stop\n":
                on_stop()
            else:
                result = json.loads(line)
    if process.returncode != 0 or result is None:
        raise BenchError(f"the load process failed (exit {process.returncode}; its errors are above)")
    return result


def main(argv: list[str]) -> None:
    """The load process: run JOB_JSON (kind `cell` or `open`) and print its results as one JSON line."""
    job = json.loads(argv[0])
    if job["kind"] == "open":
        from serving.bench.idle import open_idle

        result = asyncio.run(open_idle(job))
    elif Cell(**job["cell"]).mode == "ort_floor":
        result = _measure_floor(job)
    else:
        result = asyncio.run(_measure_server(job))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
