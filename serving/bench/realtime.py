"""The audio rows' load process (job kind `audio`): N streams paced at real time (`serving.bench.pacing`)
against a server, through a gateway's frames or on plain Streams; silero's own loop is
`serving.bench.silero_loop`.

frames  one Frames call: at each tick, every stream's chunk of that tick in one frame, as a gateway that
        carries many devices sends them; a frame leaves on its tick whether or not the last one is answered
stream  the streams' sessions spread over the job's channels, one Stream call each, every chunk a message
        leaving when its stream's chunk is due: each stream on its own clock, as independent clients are

Raw generated stubs, as in `serving.bench.drivers`: the figures should measure the server, not a client.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import numpy as np

from serving.bench.drivers import Requests, answers
from serving.bench.grid import BenchError
from serving.bench.pacing import LEAD_S, Due, Pacing, Tally, wait_s
from serving.bench.window import run_window
from serving.bench.wire import CHANNEL_OPTIONS, Job, stub
from serving.wire import pb, pb_grpc
from serving.wire.tensors import encode

# The Stream sender wakes at most once a millisecond and sends whatever is due by then: one process sending
# for hundreds of streams due microseconds apart cannot afford a loop pass per chunk. Latency counts from the
# due time, so this lateness counts against the Stream path, never for it.
MIN_SLEEP_S = 0.001
# The windows of one frame or chunk answered: (its due time, the windows its chunks complete).
_Pending = dict[str, tuple[float, int]]


def measure_audio(job: Job) -> Job:
    """Run one audio point (`job["mode"]` at `job["streams"]` streams) and return its tally's figures."""
    if job["mode"] == "silero_loop":
        from serving.bench.silero_loop import measure_loop

        return measure_loop(job)
    return asyncio.run(_measure_server(job))


async def _measure_server(job: Job) -> Job:
    channels = [
        grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) for _ in range(job["channels"])
    ]
    try:
        info = await stub(channels[0]).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        if not info.window:
            raise BenchError(f"the served model {info.name!r} is not framed (ModelInfo.window is 0)")
        gateway = job["mode"] == "frames"
        pacing = Pacing(job["streams"], job["chunk"], job["rate"], int(info.window), aligned=gateway)
        streams = _Streams(pacing, time.perf_counter() + LEAD_S, np.random.default_rng(job.get("seed", 0)))
        tally = Tally(pacing.window_s)
        services = [stub(channel) for channel in channels]
        drivers = _gateway(services[0], streams, tally) if gateway else _streams(services, streams, tally)
        warmup_s = streams.start_s + pacing.cycle_s + job["warmup_s"] - time.perf_counter()
        result = await run_window(drivers, tally, warmup_s, job["seconds"], job["settle_s"])
        await _end(services[0], streams)
        return result
    finally:
        for channel in channels:
            await channel.close()


class _Streams:
    """The streams' sessions and audio, and the clock they are paced by."""

    def __init__(self, pacing: Pacing, start_s: float, rng: np.random.Generator) -> None:
        self.pacing = pacing
        self.start_s = start_s  # perf_counter seconds of the first tick
        prefix = uuid.uuid4().hex[:8]
        self.ids = [f"{prefix}-{i}" for i in range(pacing.streams)]
        self.sent = [0] * pacing.streams  # chunks each stream has sent
        # Noise stands in for speech: ONNX Runtime's cost does not depend on what the samples say.
        noise = (0.1 * rng.standard_normal((pacing.streams, pacing.chunk, 1))).astype("<f4")
        self._frame_data = noise.tobytes()  # row after row: a frame of the first n streams is its head
        self.chunk = encode(noise[0])  # a Stream chunk: [samples, 1]

    def due_s(self, due: Due) -> float:
        """When `due` is due, in perf_counter seconds."""
        return self.start_s + due.due_s

    def frame(self, tick: list[Due], frame_id: str) -> pb.Frame:
        """One frame of every chunk of `tick`."""
        samples = self.pacing.chunk
        frame = pb.Frame(
            frame_id=frame_id,
            session_ids=[self.ids[due.stream] for due in tick],
            offsets=[due.number * samples for due in tick],
            outputs=pb.OUTPUT_MODE_ALL,
        )
        if any(due.number == 0 for due in tick):  # streams joining on this tick open their sessions
            frame.start[:] = [due.number == 0 for due in tick]
        frame.inputs.dtype = pb.DTYPE_FLOAT32
        frame.inputs.shape[:] = [len(tick), samples, 1]
        frame.inputs.data = self._frame_data[: len(tick) * samples * 4]
        for due in tick:
            self.sent[due.stream] = due.number + 1
        return frame

    def request(self, due: Due) -> pb.ChunkRequest:
        """The Stream message of `due`'s chunk."""
        self.sent[due.stream] = due.number + 1
        return pb.ChunkRequest(
            session_id=self.ids[due.stream],
            inputs=self.chunk,
            offset=due.number * self.pacing.chunk,
            start=due.number == 0,
            request_id=f"{due.stream}.{due.number}",
        )


def _gateway(service: pb_grpc.ConveyorAsyncStub, streams: _Streams, tally: Tally) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    requests: Requests[pb.Frame] = Requests(loop)
    call = service.Frames(requests)
    pending: _Pending = {}
    return [
        loop.create_task(_send_frames(requests, streams, tally, pending)),
        loop.create_task(_read_frames(call, pending, tally)),
    ]


async def _send_frames(
    requests: Requests[pb.Frame], streams: _Streams, tally: Tally, pending: _Pending
) -> None:
    pacing = streams.pacing
    for number, tick in enumerate(pacing.ticks()):
        due_s = streams.start_s + number * pacing.period_s
        if (delay := wait_s(due_s, time.perf_counter())) > 0:
            await asyncio.sleep(delay)
        if tally.over(due_s):
            return
        frame = streams.frame(tick, str(number))
        windows = sum(pacing.windows(due.number) for due in tick)
        pending[frame.frame_id] = (due_s, windows)
        tally.sent(due_s, time.perf_counter(), windows, len(tick))
        requests.put(frame)


async def _read_frames(call: grpc.aio.StreamStreamCall, pending: _Pending, tally: Tally) -> None:
    parts: dict[str, int] = {}  # windows answered so far by a frame that comes in parts
    async for result in answers(call, "result"):
        if result.errors:
            raise BenchError(f"the server refused a stream's chunk: {result.errors[0].message}")
        windows = parts.pop(result.frame_id, 0) + sum(result.output_steps)
        if result.more:
            parts[result.frame_id] = windows
            continue
        due_s, owed = pending.pop(result.frame_id)
        _check_windows(windows, owed, f"frame {result.frame_id}")
        tally.answered(due_s, owed, time.perf_counter())


def _streams(
    services: list[pb_grpc.ConveyorAsyncStub], streams: _Streams, tally: Tally
) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    queues: list[Requests[pb.ChunkRequest]] = [Requests(loop) for _ in services]
    calls = [service.Stream(queue) for service, queue in zip(services, queues, strict=True)]
    pending: _Pending = {}
    readers = [loop.create_task(_read_chunks(call, pending, tally)) for call in calls]
    return [loop.create_task(_send_chunks(queues, streams, tally, pending)), *readers]


async def _send_chunks(
    queues: list[Requests[pb.ChunkRequest]], streams: _Streams, tally: Tally, pending: _Pending
) -> None:
    pacing = streams.pacing
    for tick in pacing.ticks():
        for due in tick:
            due_s = streams.due_s(due)
            if (delay := wait_s(due_s, time.perf_counter())) > 0:
                await asyncio.sleep(max(delay, MIN_SLEEP_S))
            if tally.over(due_s):
                return
            request = streams.request(due)
            windows = pacing.windows(due.number)
            pending[request.request_id] = (due_s, windows)
            tally.sent(due_s, time.perf_counter(), windows)
            queues[due.stream % len(queues)].put(request)


async def _read_chunks(call: grpc.aio.StreamStreamCall, pending: _Pending, tally: Tally) -> None:
    async for answer in answers(call, "chunk"):
        due_s, owed = pending.pop(answer.request_id)
        _check_windows(answer.outputs.shape[0], owed, f"chunk {answer.request_id}")
        tally.answered(due_s, owed, time.perf_counter())


def _check_windows(answered: int, owed: int, what: str) -> None:
    if answered != owed:
        raise BenchError(f"the server answered {what} with {answered} windows: its chunks complete {owed}")


async def _end(service: pb_grpc.ConveyorAsyncStub, streams: _Streams) -> None:
    """End every stream's session in one frame, after the measurement, so that the next point's server holds
    only its own sessions. The senders stopped at the interval's end and what they sent was answered, unless
    the server fell too far behind to answer it in the settle: such a session refuses the frame (its offset
    is ahead) and is left to expire, which is why a refusal is no error here."""
    started = [stream for stream, sent in enumerate(streams.sent) if sent]
    if not started:
        return
    ending = streams.frame([Due(stream, streams.sent[stream], 0.0) for stream in started], "end")
    ending.end[:] = [True] * len(started)
    call = service.Frames(iter([ending]))
    async for _ in call:  # its one result: the server closes the call once it has answered
        pass
