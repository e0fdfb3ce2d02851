"""The `conveyor soak` flags (`add_arguments`) and their handler (`run`); light to import (the soak loads in
`run`), so the CLI can build its parser cheaply."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.bench.cli import DEFAULT_MODEL
from serving.bench.grid import BenchError
from serving.bench.soak.options import SoakOptions

DEFAULT_OUT = Path("reports/soak")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the soak's flags to `parser`."""
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="how long the traffic runs (default %(default)s)")
    add("--model", type=Path, default=DEFAULT_MODEL, help="artifact directory to serve (default %(default)s)")
    add("--target", help="HOST:PORT of a running server to soak instead (with --metrics-url)")
    add("--metrics-url", help="the target's http://HOST:PORT/metrics, where its resident memory is read")
    add("--sessions", type=int, default=SoakOptions.sessions, help="sessions at a time (default %(default)s)")
    add("--connections", type=int, default=SoakOptions.connections, help="shared connections (%(default)s)")
    add(
        "--think-ms", type=float, default=SoakOptions.think_ms, help="mean pause between a session's requests"
    )
    add("--idle-ttl-s", type=float, default=SoakOptions.idle_ttl_s, help="the soak's own server's idle TTL")
    add("--sample-s", type=float, default=SoakOptions.sample_s, help="memory sampled this often (seconds)")
    add(
        "--warmup-s", type=float, help="memory is judged after this (default: a fifth of the run, at most 60)"
    )
    add(
        "--max-drift-pct",
        type=float,
        default=SoakOptions.max_drift_pct,
        help="memory growth allowed after it",
    )
    add("--seed", type=int, default=SoakOptions.seed)
    add("--out", type=Path, default=DEFAULT_OUT, help="soak.txt, soak.json, soak.png go here (%(default)s)")


def options_from_args(args: argparse.Namespace) -> SoakOptions:
    """The `SoakOptions` the flags describe."""
    return SoakOptions(
        model_dir=None if args.target else args.model,
        target=args.target,
        metrics_url=args.metrics_url,
        duration_s=args.minutes * 60,
        sessions=args.sessions,
        connections=args.connections,
        think_ms=args.think_ms,
        idle_ttl_s=args.idle_ttl_s,
        sample_s=args.sample_s,
        warmup_s=args.warmup_s,
        max_drift_pct=args.max_drift_pct,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> None:
    """Run the soak the flags describe, print its report and write it under --out; `BenchError` (a non-zero
    exit) when it saw anything unexpected or memory drifted too far."""
    from serving.bench.soak.report import format_report, plot, write_json
    from serving.bench.soak.run import run_soak

    options = options_from_args(args)
    result = run_soak(options, progress=lambda line: print(line, flush=True))
    report = format_report(result)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.txt").write_text(report + "\n")
    write_json(result, args.out / "soak.json")
    plot(result, args.out / "soak.png")
    print(f"\nwritten: {args.out}/soak.txt, soak.json, soak.png")
    if not result.passed:
        raise BenchError(result.verdict())
