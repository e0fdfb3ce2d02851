"""`conveyor bench --audio`: how many real-time audio streams one server holds with a framed model (silero
VAD), against silero's own per-stream loop and ONNX Runtime alone.

Modes:
    frames       a gateway: one load process carrying every stream, each 20 ms tick's chunks in one frame
    stream       the same streams on plain Streams (16 channels), a message per chunk, each stream on its
                 own clock (their sends spread over the tick, as independent clients' are)
    silero_loop  silero's OnnxWrapper per stream, one ORT call per window, in one process (no server), the
                 chunks coming as the gateway's do
    ort_floor    ONNX Runtime alone, run as the server's runner runs it (its threads and parallel calls), at
                 the batch the server reached: windows per second, and the streams they would carry

A count of streams is held when its p99 window latency (from when the chunk completing a window is due to
when its probability arrives) is under one window period and nothing is dropped. Each searched mode doubles
its count while held, then bisects between the last held and the first missed (`serving.bench.pacing` has
the pacing and the tally; `serving.bench.realtime` and `serving.bench.silero_loop` the load processes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from modelcard import CARD_FILE, spec_from_card
from modelcard.framing import Framing
from serving.bench.audio_grid import AUDIO_MODES, AudioOptions, AudioRow
from serving.bench.grid import BenchError, BenchOptions, Cell, require_model
from serving.bench.host import Host, HostSpec, hosting, runner_config
from serving.bench.load import run_load
from serving.bench.report import pyplot, save
from serving.bench.run import Probe, measure_cell, per_1k
from serving.bench.targets import Check
from serving.bench.wire import Job

_SERVED = ("frames", "stream")  # the modes that drive the server


def run_audio(options: AudioOptions, on_row: Callable[[AudioRow], None] | None = None) -> list[AudioRow]:
    """Search each mode's most streams held, in order: the server's modes, silero's loop once the server
    has stopped, then the floor at the batch the gateway's held row reached. `on_row` sees each row."""
    require_model(options.model_dir)
    framing = _framing(options.model_dir)
    rows: list[AudioRow] = []

    def kept(row: AudioRow) -> AudioRow:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        return row

    def points(mode: str, host: Host | None) -> Callable[[int], AudioRow]:
        return lambda streams: kept(_point(mode, streams, framing, options, host))

    config = {"max_batch_size": options.max_batch_size}
    config |= runner_config(options.ort_threads, options.ort_parallel_calls)
    with hosting(HostSpec("server", options.model_dir, config)) as host:
        for mode in (mode for mode in options.modes if mode in _SERVED):
            search(points(mode, host), options)
    if "silero_loop" in options.modes:
        search(points("silero_loop", None), options)
    if "ort_floor" in options.modes:
        kept(_floor(rows, framing, options))
    return rows


def bound_ms(options: AudioOptions) -> float:
    """The p99 a count of streams must stay under: one window period."""
    return _window_ms(_framing(options.model_dir), options)


def _window_ms(framing: Framing, options: AudioOptions) -> float:
    return 1000 * framing.window / options.rate


def _framing(model_dir: Path) -> Framing:
    spec = spec_from_card(json.loads((model_dir / CARD_FILE).read_text()))
    if spec.framing is None:
        raise BenchError(
            f"--audio needs a framed model (steps are samples, run in windows), and {model_dir} is not one: "
            "card silero VAD with conveyor card ... --window 512 --context 64 (docs/benchmarks.md)"
        )
    return spec.framing


def search(measure: Callable[[int], AudioRow], options: AudioOptions) -> None:
    """Coarse, then fine: double the count while it is held, then bisect between the last count held and
    the first missed `options.fine_steps` times."""
    held, missed, streams = 0, 0, options.first_streams
    while streams <= options.most_streams:
        row = measure(streams)
        if row.note:
            return  # it cannot run: one row says why
        if not row.held:
            missed = streams
            break
        held, streams = streams, streams * 2
    for _ in range(options.fine_steps if missed else 0):
        streams = (held + missed) // 2
        if streams in (held, missed):
            return
        held, missed = (streams, missed) if measure(streams).held else (held, streams)


def _point(mode: str, streams: int, framing: Framing, options: AudioOptions, host: Host | None) -> AudioRow:
    """One count of streams in one mode, in a load process; the server's CPU and batches from `host`."""
    job: Job = {
        "kind": "audio",
        "mode": mode,
        "streams": streams,
        "chunk": options.chunk,
        "rate": options.rate,
        "window": framing.window,
        "target": host.target if host else None,
        "model_dir": str(options.model_dir),
        "channels": min(options.channels, streams) if mode == "stream" else 1,
        "warmup_s": options.warmup_s,
        "seconds": options.seconds,
        "settle_s": options.settle_s,
    }
    probe = Probe(host)
    result = run_load(job, probe.start, probe.stop)
    if "note" in result:
        missing = (None, None, None, False, None, None, None)  # p50 to mean batch
        return AudioRow(mode, streams, math.nan, *missing, windows=0, seconds=0.0, note=result["note"])
    windows, seconds = result["windows"], result["seconds"]
    in_process = host is None  # silero's loop: the process running ORT is the load process
    p99_ms, dropped = result["p99_ms"], result["dropped"]
    return AudioRow(
        mode=mode,
        streams=streams,
        windows_per_s=windows / seconds,
        p50_ms=result["p50_ms"],
        p99_ms=p99_ms,
        dropped=dropped,
        held=dropped == 0 and p99_ms < _window_ms(framing, options),  # NaN (none answered): not held
        cpu_ms_per_window=per_1k(result["cpu_s"] if in_process else probe.server_cpu_s(), windows),
        load_cpu_ms_per_window=None if in_process else per_1k(result["cpu_s"], windows),
        mean_batch=1.0 if in_process else probe.mean_batch(),
        windows=windows,
        seconds=seconds,
    )


def _floor(rows: Sequence[AudioRow], framing: Framing, options: AudioOptions) -> AudioRow:
    """ONNX Runtime alone (the bench's ort_floor, as the server's runner calls it) at the batch the gateway
    reached at the most streams it held (or at the server's max batch size, without such a row)."""
    gateway = most_held(rows).get("frames")
    batch = round(gateway.mean_batch) if gateway and gateway.mean_batch else options.max_batch_size
    source = f"the frames row's at {gateway.streams} streams" if gateway else "the server's max batch size"
    bench = BenchOptions(
        model_dir=options.model_dir,
        warmup_s=options.warmup_s,
        seconds=options.seconds,
        ort_threads=options.ort_threads,
        ort_parallel_calls=options.ort_parallel_calls,
    )
    row = measure_cell(Cell("ort_floor", batch, 1, 0, 0), None, bench)  # one window per row and call
    windows_per_stream_s = options.rate / framing.window
    return AudioRow(
        mode="ort_floor",
        streams=math.floor(row.timesteps_per_s / windows_per_stream_s),
        windows_per_s=row.timesteps_per_s,
        p50_ms=row.p50_ms,
        p99_ms=row.p99_ms,
        dropped=None,
        held=None,
        cpu_ms_per_window=row.cpu_s_per_1k_steps,  # seconds per 1000 windows: ms per window
        load_cpu_ms_per_window=None,
        mean_batch=row.mean_batch,
        windows=row.chunks,
        seconds=row.seconds,
        note=f"batches of {batch} windows ({source}), {options.ort_threads} thread, "
        f"{options.ort_parallel_calls} call(s) at once",
    )


def most_held(rows: Sequence[AudioRow]) -> dict[str, AudioRow]:
    """Each searched mode's row held at the most streams, and the floor's row."""
    best: dict[str, AudioRow] = {}
    for row in rows:
        counts = row.held or row.mode == "ort_floor"
        if counts and (row.mode not in best or row.streams > best[row.mode].streams):
            best[row.mode] = row
    return best


def check_aims(rows: Sequence[AudioRow]) -> list[Check]:
    """The issue's aims for the gateway's streams, against silero's loop and against the floor."""
    best = most_held(rows)
    frames = best.get("frames")

    def ratio(mode: str) -> float | None:
        other = best.get(mode)
        if frames is None or other is None or not other.streams:
            return None
        return frames.streams / other.streams

    return [
        Check("audio: frames streams held / silero loop streams held", ratio("silero_loop"), 3, True),
        Check("audio: frames streams held / ort_floor streams", ratio("ort_floor"), 0.6, True),
    ]


def plot_audio(rows: Sequence[AudioRow], path: Path, options: AudioOptions) -> None:
    """p99 window latency and server CPU per window against streams, one line per searched mode (filled:
    held, hollow: missed), the bound and the floor's streams marked."""
    plt, bound = pyplot(), bound_ms(options)
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(14, 5))
    floor = most_held(rows).get("ort_floor")
    for i, mode in enumerate(mode for mode in AUDIO_MODES if mode != "ort_floor"):
        series = sorted((row for row in rows if row.mode == mode and row.p99_ms is not None), key=_streams)
        if not series:
            continue
        color, streams = f"C{i}", [row.streams for row in series]
        for axis, values in ((latency, [row.p99_ms for row in series]), (cpu, [_cpu(row) for row in series])):
            axis.plot(streams, values, "-", color=color, label=mode)
            for row, value in zip(series, values, strict=True):
                axis.plot(row.streams, value, "o", color=color, fillstyle="full" if row.held else "none")
    latency.axhline(bound, color="grey", linestyle="--", label=f"{bound:g} ms: one window")
    for axis in (latency, cpu):
        if floor is not None:
            label = f"ort_floor: {floor.streams} streams"
            axis.axvline(floor.streams, color="black", linestyle=":", label=label)
        axis.set(xscale="log", yscale="log", xlabel="streams (16 kHz, 20 ms chunks)")
        axis.grid(True, which="both", alpha=0.3)
    latency.set(ylabel="p99 window latency (ms)", title="latency (filled: held, hollow: missed)")
    cpu.set(ylabel="CPU ms per window (server, or silero's loop)", title="CPU per window")
    latency.legend(fontsize=8)
    save(figure, path)


def _streams(row: AudioRow) -> int:
    return row.streams


def _cpu(row: AudioRow) -> float:
    return math.nan if row.cpu_ms_per_window is None else row.cpu_ms_per_window
