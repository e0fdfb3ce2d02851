"""The load process: drives one cell against a server (or ONNX Runtime alone) and reports what it measured.

The parent runs `python -m serving.bench.load JOB_JSON` and reads its stdout: `start` when the measured window
opens, `stop` when it closes (the parent reads the server's CPU time at each), then one JSON line of results.
The clients are `serving.bench.drivers`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from serving.bench.drivers import start_drivers
from serving.bench.grid import BenchError, Cell
from serving.bench.window import Window
from serving.bench.wire import CHANNEL_OPTIONS, Job, inputs_maker, stub
from serving.wire import pb


async def _measure_server(job: Job) -> Job:
    cell = Cell(**job["cell"])
    channels = [
        grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) for _ in range(cell.channels)
    ]
    try:
        info = await stub(channels[0]).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        make = inputs_maker(info, np.random.default_rng(job.get("seed", 0)))
        window = Window()
        tasks = start_drivers(cell, channels, make, window, job["frames_in_flight"])
        return await _run_window(tasks, window, job["warmup_s"], job["seconds"])
    finally:
        for channel in channels:
            await channel.close()


async def _run_window(
    drivers: list[asyncio.Task[None]], window: Window, warmup_s: float, seconds: float
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

    window = Window()
    _repeat(step, job["warmup_s"], window, batch, cell.chunk_steps)  # closed window: nothing counted
    cpu_s = time.process_time()
    window.open()
    _repeat(step, job["seconds"], window, batch, cell.chunk_steps)
    window.close()
    return window.result(time.process_time() - cpu_s, batch=batch)


def _repeat(step: Callable[[], None], seconds: float, window: Window, batch: int, steps: int) -> None:
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
