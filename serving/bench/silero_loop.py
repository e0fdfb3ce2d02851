"""The audio rows' alternative: silero's own per-stream loop in one process, paced as the gateway's streams.

Each stream keeps silero's `OnnxWrapper` state (its recurrent state and its 64 context samples) and, as a
stream's samples arrive, every window they complete is one call of the wrapper, so one ONNX Runtime call per
window per stream, as `OnnxWrapper.__call__` and silero's streaming examples do. The streams share one loaded
model (a copy of the wrapper per stream, its state reset): what a process serving many streams with the
wrapper keeps, and the kindest case for it, since the one model's weights stay in cache.

The chunks come as the gateway's do (`Pacing.aligned`): every stream's chunk of a tick at once, the streams
at staggered window phases, and the loop runs them one after another. That is kinder to the loop than
arrivals spread over the tick, which cost it a sleep and a wake-up per chunk.

The wrapper needs torch (the silero wheel's dependency). The bench reaches torch through the wrapper's own
module and imports none itself: no part of `serving` imports torch (tests/test_architecture.py).
"""

from __future__ import annotations

import copy
import importlib
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from modelcard import ONNX_FILE
from serving.bench.pacing import LEAD_S, Pacing, Tally, wait_s
from serving.bench.wire import Job

_AUDIO_WINDOWS = 64  # windows of noise the streams read from, each from its own place


def measure_loop(job: Job) -> Job:
    """Run silero's loop for `job["streams"]` streams; its tally's figures, or a note of why it could not."""
    utils_vad = _wrapper_module()
    if isinstance(utils_vad, str):
        return {"note": utils_vad}
    pacing = Pacing(job["streams"], job["chunk"], job["rate"], job["window"], aligned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that a file named *16k* runs at 16 kHz only: it does
        prototype = utils_vad.OnnxWrapper(str(Path(job["model_dir"]) / ONNX_FILE), force_onnx_cpu=True)
    loop = _Loop(prototype, pacing, _noise(utils_vad, pacing, job.get("seed", 0)))
    start_s = time.perf_counter() + LEAD_S
    open_s = start_s + pacing.cycle_s + job["warmup_s"]
    return loop.run(start_s, open_s, open_s + job["seconds"])


def _wrapper_module() -> ModuleType | str:
    """silero's `utils_vad`, or why it cannot be imported."""
    try:
        return importlib.import_module("silero_vad.utils_vad")  # untyped: its names are reached as Any
    except ImportError as exc:
        return f"silero's OnnxWrapper is not importable here ({exc}): it needs the silero-vad wheel and torch"


def _noise(utils_vad: ModuleType, pacing: Pacing, seed: int) -> Any:
    """Windows of noise as one torch tensor (the wrapper takes torch tensors), made by the wrapper's torch."""
    rng = np.random.default_rng(seed)
    samples = (0.1 * rng.standard_normal(_AUDIO_WINDOWS * pacing.window)).astype(np.float32)
    return utils_vad.torch.from_numpy(samples)


class _Loop:
    """Every stream's wrapper, run on its windows as their samples come due."""

    def __init__(self, prototype: Any, pacing: Pacing, audio: Any) -> None:
        self._wrappers = [_own_state(prototype) for _ in range(pacing.streams)]
        self._pacing = pacing
        self._audio = audio
        self._done = [0] * pacing.streams  # windows each stream has run
        self._tally = Tally(pacing.window_s)

    def run(self, start_s: float, open_s: float, close_s: float) -> Job:
        """Run the chunks due from `start_s` on, in order, until those due before `close_s` are done;
        counted from `open_s`. The interval opens and closes on those times, not on when the loop gets there:
        a loop behind real time still owes the windows due in it."""
        cpu_s: float | None = None  # this process's CPU time as the interval opened
        for tick in self._pacing.ticks():
            for due in tick:
                due_s = start_s + due.due_s
                if due_s >= open_s and cpu_s is None:
                    self._tally.open(open_s)
                    cpu_s = time.process_time()
                if due_s >= close_s and cpu_s is not None:
                    self._tally.close(close_s)
                    return self._tally.result(time.process_time() - cpu_s)
                if (delay := wait_s(due_s, time.perf_counter())) > 0:
                    time.sleep(delay)  # a sleep of 0 is still a system call: only when early
                self._chunk(due.stream, due.number, due_s)
        raise AssertionError("the pacing's ticks never end")

    def _chunk(self, stream: int, index: int, due_s: float) -> None:
        """Stream `stream`'s chunk `index` has come: run each window it completes, as silero's loop does."""
        windows = self._pacing.windows(index)
        self._tally.sent(due_s, time.perf_counter(), windows)
        width = self._pacing.window
        for _ in range(windows):
            start = (stream + self._done[stream]) % _AUDIO_WINDOWS * width
            self._wrappers[stream](self._audio[start : start + width], self._pacing.rate).item()
            self._done[stream] += 1
        self._tally.answered(due_s, windows, time.perf_counter())


def _own_state(prototype: Any) -> Any:
    """A wrapper sharing `prototype`'s loaded model, with a fresh state of its own."""
    wrapper = copy.copy(prototype)
    wrapper.reset_states()
    return wrapper
