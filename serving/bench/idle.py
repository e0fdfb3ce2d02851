"""The load process's `open` job, for `--memory`: open N sessions and hold them, idle, while the parent
measures the server, then let them go.

Sessions are opened over streams that stay open while the parent measures: an idle session whose stream is
still open is the common case (a client between chunks), and it costs the server a little more than one
whose stream has closed.
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import numpy as np

from serving.bench.grid import BenchError
from serving.bench.wire import CHANNEL_OPTIONS, Job, inputs_maker, say, stub
from serving.wire import pb


async def open_idle(job: Job) -> Job:
    """Open `job["sessions"]` one-step sessions (ids issued by the server) over `job["channels"]` streams,
    say `start`, hold them until stdin closes, then close the streams."""
    started = time.perf_counter()
    channels = [
        grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) for _ in range(job["channels"])
    ]
    try:
        info = await stub(channels[0]).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        inputs = inputs_maker(info, np.random.default_rng(0))(1)
        request = pb.ChunkRequest(inputs=inputs, start=True, outputs=pb.OUTPUT_MODE_LAST)
        calls = [stub(channel).Stream() for channel in channels]
        shares = [len(range(i, job["sessions"], len(calls))) for i in range(len(calls))]
        await asyncio.gather(*(_open_on(call, request, n) for call, n in zip(calls, shares, strict=True)))
        opened_s = time.perf_counter() - started
        say("start")
        await asyncio.to_thread(sys.stdin.read)  # the parent has measured
        for call in calls:
            await call.done_writing()
    finally:
        for channel in channels:
            await channel.close()
    return {"opened": sum(shares), "seconds": opened_s}


async def _open_on(call: grpc.aio.StreamStreamCall, request: pb.ChunkRequest, count: int) -> None:
    async def write() -> None:
        for _ in range(count):
            await call.write(request)  # grpc flow control and the server's window pace this

    writer = asyncio.create_task(write())
    answered = 0
    while answered < count:
        response = await call.read()
        kind = response.WhichOneof("kind") if response is not grpc.aio.EOF else "eof"
        if kind != "chunk":
            raise BenchError(f"the server did not open a session: {response}")
        answered += 1
    await writer
