"""Triton's perf_analyzer and Conveyor's own bench against ONE server, in one run: the rows side by side.

    .venv/bin/python scripts/bench_triton.py --model artifacts/sensor-h256 [--concurrency 1,16,64] \
        [--json F.json] [--plot F.png]          # `make bench-triton`

One `conveyor serve` (the bench's server process, batches of up to 64, one ORT thread) serves both sides:
- pa_unary / pa_stream: perf_analyzer (bundled in the tritonclient wheel of .venv-triton, started through
  scripts/perf_analyzer.py) over the Open Inference Protocol, as a sequence model: each of `concurrency`
  sequences keeps one 1-step request in flight, ModelInfer calls or (--streaming) ModelStreamInfer streams,
  sequences of 300 requests (+/- 20%) one after another; perf_analyzer's latency percentiles and
  throughput, from its stable measurement windows;
- batched / one_stream: `conveyor bench`'s cells of the same shape over the native protocol: `concurrency`
  sessions, one 1-step chunk in flight each, on Stream calls over 16 channels (one_stream: all on one).
The server's CPU and mean batch come from the same probe for both: its /proc CPU time and /metrics batch
totals before and after each cell (a perf_analyzer cell's window spans its whole run, stabilization
included, so its CPU per step is taken over every step the server ran in it).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.bench.grid import BenchOptions, Cell, Row
from serving.bench.host import Host, HostSpec, hosting, runner_config
from serving.bench.report import format_row, format_table, plot, write_json
from serving.bench.run import Probe, measure_cell, per_1k

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer.py"
MAX_BATCH = 64


def perf_analyzer_row(host: Host, model: str, concurrency: int, streaming: bool, measurement_ms: int) -> Row:
    """One perf_analyzer run at `concurrency` against `host`: its CSV line as a bench row."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "pa.csv"
        argv = [str(TRITON_PYTHON), str(PERF_ANALYZER), "--target", host.target, "--model", model,
                "--csv", str(report), "--concurrency", f"{concurrency}:{concurrency}",
                "--measurement-ms", str(measurement_ms), *(["--streaming"] if streaming else [])]  # fmt: skip
        probe, children_before = Probe(host), _children_cpu_s()
        probe.start()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        probe.stop()
        if done.returncode != 0:
            raise SystemExit(f"perf_analyzer failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        (line,) = csv.DictReader(report.open())
    load_cpu_s = _children_cpu_s() - children_before
    rows_run = probe.rows_run()
    per_s = float(line["Inferences/Second"])
    return Row(
        mode="pa_stream" if streaming else "pa_unary",
        sessions=concurrency,
        chunk_steps=1,
        history_steps=0,
        channels=concurrency if streaming else 1,  # perf_analyzer: one stream per sequence, or one channel
        timesteps_per_s=per_s,
        chunks_per_s=per_s,
        p50_ms=float(line["p50 latency"]) / 1000,  # microseconds in its CSV
        p99_ms=float(line["p99 latency"]) / 1000,
        cpu_s_per_1k_steps=per_1k(probe.server_cpu_s(), rows_run),
        load_cpu_s_per_1k_steps=per_1k(load_cpu_s, rows_run),
        mean_batch=probe.mean_batch(),
        chunks=int(rows_run),
        seconds=measurement_ms / 1000,
    )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # perf_analyzer and its Python launcher, once ended
    return usage.ru_utime + usage.ru_stime


def native_row(host: Host, options: BenchOptions, mode: str, concurrency: int) -> Row:
    channels = 1 if mode == "one_stream" else min(options.channels, concurrency)
    return measure_cell(Cell(mode, concurrency, 1, 0, channels), host, options)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("artifacts/sensor-h256"))
    parser.add_argument("--concurrency", default="1,16,64", help="comma list (default %(default)s)")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer's window")
    parser.add_argument("--seconds", type=float, default=4.0, help="the native cells' measured seconds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not TRITON_PYTHON.exists():
        raise SystemExit("no .venv-triton: run `make triton-client`")
    levels = [int(word) for word in args.concurrency.split(",")]
    options = BenchOptions(model_dir=args.model, max_batch_size=MAX_BATCH, seconds=args.seconds)
    name = json.loads((args.model / "model.json").read_text())["name"]  # the model's name on the v2 side
    config = {"max_batch_size": MAX_BATCH, "store": "memory"} | runner_config(options.ort_threads, 1)
    rows: list[Row] = []
    print(format_table([]), flush=True)
    with hosting(HostSpec("server", args.model, config)) as host:
        for concurrency in levels:  # the four of one level minutes apart at most, on a drifting machine
            level = [native_row(host, options, mode, concurrency) for mode in ("batched", "one_stream")]
            level += [
                perf_analyzer_row(host, name, concurrency, streaming, args.measurement_ms)
                for streaming in (False, True)
            ]
            for row in level:
                print(format_row(row), flush=True)
            rows += level
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
