"""The load process: drives one cell against a server (or ONNX Runtime alone), or several parts side by side
(job kind `parts`: `serving.bench.grid.Part`, each on a version of its own), and reports what it measured.

The parent runs `python -m serving.bench.load JOB_JSON` and reads its stdout: `start` when the measured window
opens, `stop` when it closes (the parent reads the server's CPU time at each), then one JSON line of results.
The clients are `serving.bench.drivers`; the audio rows' are `serving.bench.realtime`.
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

from modelcard import ModelSpec
from serving.bench.drivers import start_drivers
from serving.bench.grid import BenchError, Cell, Part
from serving.bench.window import Window, Windows, run_window
from serving.bench.wire import CHANNEL_OPTIONS, Job, inputs_maker, stub
from serving.wire import pb


async def _measure_server(job: Job) -> Job:
    """A cell's clients (one part), or each of the job's parts on channels of its own."""
    parts = [Part.from_json(part) for part in job["parts"]] if "parts" in job else [Part(Cell(**job["cell"]))]
    channels = [
        grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS)
        for _ in range(sum(part.cell.channels for part in parts))
    ]
    try:
        info = await stub(channels[0]).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        make = inputs_maker(info, np.random.default_rng(job.get("seed", 0)))
        windows, tasks, taken = Windows(len(parts)), [], 0
        for part, window in zip(parts, windows.parts, strict=True):
            mine, taken = channels[taken : taken + part.cell.channels], taken + part.cell.channels
            tasks += start_drivers(part, mine, make, window, job["frames_in_flight"])
        return await run_window(tasks, windows, job["warmup_s"], job["seconds"])
    finally:
        for channel in channels:
            await channel.close()


def _measure_floor(job: Job) -> Job:
    from serving.server.onnx_runner import OnnxStepRunner

    cell = Cell(**job["cell"])
    runner = OnnxStepRunner.load(
        Path(job["model_dir"]), intra_op_threads=job["ort_threads"], parallel_calls=job["ort_parallel_calls"]
    )
    spec = runner.spec
    batch = cell.sessions  # what one frame of every session runs (the batched server splits it at its max)
    x = _runner_inputs(spec, batch, cell.chunk_steps, np.random.default_rng(job.get("seed", 0)))
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


def _runner_inputs(spec: ModelSpec, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """What the server's runner is given for `batch` chunks of `steps` steps; a framed model's steps are
    windows, each its context and window of samples (the server cuts them from a chunk's samples)."""
    from modelcard.graph import random_inputs

    if spec.framing is None:
        return random_inputs(spec, batch, steps, rng)
    return rng.standard_normal((batch, steps, spec.framing.width), dtype=np.float32)


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
    """The load process: run JOB_JSON (kind `cell`, `parts`, `open` or `audio`) and print its results as one
    JSON line."""
    job = json.loads(argv[0])
    if job["kind"] == "open":
        from serving.bench.idle import open_idle

        result = asyncio.run(open_idle(job))
    elif job["kind"] == "audio":
        from serving.bench.realtime import measure_audio

        result = measure_audio(job)
    elif job["kind"] == "cell" and Cell(**job["cell"]).mode == "ort_floor":
        result = _measure_floor(job)
    else:
        result = asyncio.run(_measure_server(job))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
