"""The `conveyor bench` flags (`add_arguments`) and their handler (`run`); light to import (stages load in
`run`), so the CLI can build its parser cheaply."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from serving.bench.audio_grid import AUDIO_MODES, AudioOptions
from serving.bench.grid import MODES, BenchError, BenchOptions, quick
from serving.bench.versions_grid import CASES, VersionsOptions, quick_versions

DEFAULT_MODEL = Path("artifacts/language")
QUICK_MEMORY_SESSIONS = 10_000


# Flags that, when given, replace the field of the same name (after --quick has picked its grid).
_FIELDS = (
    "modes",
    "sessions",
    "chunk_steps",
    "histories",
    "one_stream_sessions",
    "frame_sessions",
    "frames_in_flight",
    "channels",
    "seconds",
    "warmup_s",
    "max_batch_size",
    "repeats",
    "store",
    "ort_parallel_calls",
)
# The ones that also set --audio's options, and --versions'.
_AUDIO_FIELDS = ("modes", "channels", "seconds", "warmup_s", "max_batch_size", "ort_parallel_calls")
_VERSIONS_FIELDS = (
    "sessions",
    "chunk_steps",
    "channels",
    "seconds",
    "warmup_s",
    "max_batch_size",
    "repeats",
    "ort_parallel_calls",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's flags to `parser` (the `conveyor bench` subcommand's, or a standalone one)."""
    full, fast = BenchOptions(model_dir=DEFAULT_MODEL), quick(BenchOptions(model_dir=DEFAULT_MODEL))
    audio, versions = AudioOptions(model_dir=DEFAULT_MODEL), VersionsOptions(model_dir=DEFAULT_MODEL)
    add = parser.add_argument
    add("--model", type=Path, default=DEFAULT_MODEL, help="artifact directory to serve (default %(default)s)")
    add("--target", help="HOST:PORT of a running server to drive instead (modes batched and stateless only)")
    add("--quick", action="store_true", help=f"sessions {_show(fast.sessions)}, short cells: under 2 minutes")
    add("--modes", type=_words, help=f"comma list (default all: {_show(MODES)})")
    add("--sessions", type=_counts, help=f"comma list (default {_show(full.sessions)})")
    add("--chunk-steps", type=_counts, help=f"comma list (default {_show(full.chunk_steps)})")
    add("--histories", type=_counts, help=f"history lengths (default {_show(full.histories)})")
    add(
        "--one-stream-sessions",
        type=_counts,
        help=f"one_stream's sessions, all on one stream (default {_show(full.one_stream_sessions)})",
    )
    add(
        "--frame-sessions",
        type=_counts,
        help=f"frames' sessions, at every chunk length (default {_show(full.frame_sessions)})",
    )
    add(
        "--frames-in-flight",
        type=int,
        help=f"frames mode: frames taking turns, sessions split among them (default {full.frames_in_flight})",
    )
    add("--channels", type=int, help=f"gRPC connections of the load process (default {full.channels})")
    add("--seconds", type=float, help=f"measured per cell (default {full.seconds}; quick {fast.seconds})")
    add("--warmup-s", type=float, help=f"warm-up per cell (default {full.warmup_s}; quick {fast.warmup_s})")
    add("--max-batch-size", type=int, help=f"the batched server's (default {full.max_batch_size})")
    add(
        "--ort-parallel-calls",
        type=int,
        help=f"the server's ort_parallel_calls, and the floor's (default {full.ort_parallel_calls})",
    )
    add("--repeats", type=int, help="passes over the grid; each figure is the median (default 1)")
    add("--store", help="a Redis URL: also run the durable mode, the server with its sessions there")
    add("--json", type=Path, help="write the rows (or the --memory result) as JSON here")
    add("--plot", type=Path, help="write a PNG of throughput and p99 latency against sessions here")
    add("--memory", action="store_true", help="measure what idle sessions cost in server memory instead")
    add("--memory-sessions", type=int, help="idle sessions to open (default 100000; quick 10000)")
    add(
        "--audio",
        action="store_true",
        help="the audio rows instead, for a framed model (--model artifacts/silero-vad-16k): the most "
        "real-time streams held in frames and on Stream, by silero's own loop, and ONNX Runtime's floor "
        f"(modes {_show(AUDIO_MODES)})",
    )
    add(
        "--audio-streams",
        type=_counts,
        help=f"--audio's first and most streams (default {audio.first_streams},{audio.most_streams})",
    )
    add(
        "--versions",
        action="store_true",
        help="two versions of the model served at once instead: their timesteps/s both busy against one "
        "version's, and a small paced version's p99 alone and beside a busy one, in one run (cases "
        f"{_show(CASES)}; --sessions takes one count, default {versions.sessions}; --chunk-steps default "
        f"{_show(versions.chunk_steps)}; --repeats default {versions.repeats})",
    )
    add(
        "--small-sessions",
        type=int,
        help=f"--versions: the small version's sessions (default {versions.small_sessions})",
    )
    add(
        "--small-period-ms",
        type=float,
        help=f"--versions: ms between a small session's chunks (default {versions.small_period_ms:g})",
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The `BenchOptions` the flags describe."""
    options = BenchOptions(model_dir=None if args.target else args.model, target=args.target)
    options = quick(options) if args.quick else options
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    return replace(options, **given)


def run(args: argparse.Namespace) -> None:
    """Run the bench the flags describe: the table (and the targets) on stdout, JSON and PNG where asked."""
    if args.memory:
        _run_memory(args)
        return
    if args.audio:
        _run_audio(args)
        return
    if args.versions:
        _run_versions(args)
        return
    from serving.bench.report import format_row, format_table, plot, write_json
    from serving.bench.run import run_bench
    from serving.bench.targets import check_targets, format_checks

    options = options_from_args(args)
    print(format_table([]), flush=True)  # the header; rows follow as they are measured
    rows = run_bench(options, on_row=lambda row: print(format_row(row), flush=True))
    if options.repeats > 1:
        print(f"\nmedians of {options.repeats} passes:\n{format_table(rows)}")
    print("\n" + format_checks(check_targets(rows)))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot(rows, args.plot)


def _run_memory(args: argparse.Namespace) -> None:
    import json

    from serving.bench.memory import MemoryOptions, run_memory

    sessions = args.memory_sessions or (QUICK_MEMORY_SESSIONS if args.quick else MemoryOptions.sessions)
    channels = args.channels or MemoryOptions.channels
    result = run_memory(MemoryOptions(args.model, sessions, channels))
    print(result.summary())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")


def audio_options_from_args(args: argparse.Namespace) -> AudioOptions:
    """The `AudioOptions` the flags describe (--audio); flags of the grid alone are refused."""
    _refuse_others(args, _AUDIO_FIELDS, "--audio starts its own server and searches its own counts")
    options = AudioOptions(model_dir=args.model)
    options = replace(options, fine_steps=2, warmup_s=0.5, seconds=3.0) if args.quick else options
    given = {name: getattr(args, name) for name in _AUDIO_FIELDS if getattr(args, name) is not None}
    if args.audio_streams is not None:
        if len(args.audio_streams) != 2:
            raise BenchError("--audio-streams takes two counts: FIRST,MOST")
        given |= {"first_streams": args.audio_streams[0], "most_streams": args.audio_streams[1]}
    return replace(options, **given)


def _refuse_others(args: argparse.Namespace, fields: tuple[str, ...], why: str) -> None:
    """Raise `BenchError` naming --target and the grid's flags given that are not among `fields`."""
    unused = [name for name in _FIELDS if name not in fields and getattr(args, name) is not None]
    if args.target or unused:
        names = ["target"] * bool(args.target) + unused
        flags = ", ".join("--" + name.replace("_", "-") for name in names)
        raise BenchError(f"{why}: drop {flags}")


def versions_options_from_args(args: argparse.Namespace) -> VersionsOptions:
    """The `VersionsOptions` the flags describe (--versions); flags of the grid alone are refused."""
    _refuse_others(args, _VERSIONS_FIELDS, "--versions starts its own servers and runs its own cases")
    options = VersionsOptions(model_dir=args.model)
    options = quick_versions(options) if args.quick else options
    given = {name: getattr(args, name) for name in _VERSIONS_FIELDS if getattr(args, name) is not None}
    if args.sessions is not None:
        if len(args.sessions) != 1:
            raise BenchError("--versions takes one count of --sessions: the full load's")
        given["sessions"] = args.sessions[0]
    small = {"small_sessions": args.small_sessions, "small_period_ms": args.small_period_ms}
    return replace(options, **given, **{name: value for name, value in small.items() if value is not None})


def _run_versions(args: argparse.Namespace) -> None:
    from serving.bench.report import format_row, format_table, write_json
    from serving.bench.targets import format_checks
    from serving.bench.versions import check_versions, plot_versions, run_versions, summary
    from serving.bench.versions_grid import COLUMNS

    options = versions_options_from_args(args)
    print(format_table([], COLUMNS), flush=True)  # the header; rows follow as they are measured
    run = run_versions(options, on_row=lambda row: print(format_row(row, COLUMNS), flush=True))
    if options.repeats > 1:
        print(f"\nmedians of {options.repeats} passes:\n{format_table(run.rows, COLUMNS)}")
    print("\n" + summary(run, options))
    print("\n" + format_checks(check_versions(run, options)))
    if args.json:
        write_json(run.rows, args.json)
    if args.plot:
        plot_versions(run.rows, args.plot, options)


def _run_audio(args: argparse.Namespace) -> None:
    from serving.bench.audio import check_aims, most_held, plot_audio, run_audio
    from serving.bench.audio_grid import COLUMNS
    from serving.bench.report import format_row, format_table, write_json
    from serving.bench.targets import format_checks

    options = audio_options_from_args(args)
    print(format_table([], COLUMNS), flush=True)  # the header; rows follow as they are measured
    rows = run_audio(options, on_row=lambda row: print(format_row(row, COLUMNS), flush=True))
    print("\nthe most streams held (p99 under one window, nothing dropped), and the floor:")
    print(format_table(list(most_held(rows).values()), COLUMNS))
    print("\n" + format_checks(check_aims(rows)))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot_audio(rows, args.plot, options)


def _show(values: tuple[object, ...]) -> str:
    return ",".join(str(value) for value in values)


def _words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in _words(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from exc


__all__ = ["BenchError", "add_arguments", "options_from_args", "run"]
