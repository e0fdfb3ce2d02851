"""`conveyor bench --versions`: what serving two versions of one model at once costs, and whether a small
version keeps its latency beside a busy one (the cases are `serving.bench.versions_grid`'s).

Two server processes of the model repository, started once and kept for the run: one publishing the
artifact as version 1 alone, one publishing the same artifact as versions 1 and 2, both served
(`{"latest": 2}`). Each case is one load process (`serving.bench.load`, job kind `parts`) whose parts each
start their sessions on one version and count their answers apart; the cases alternate, `repeats` times, and
each row is the median of its passes. A ratio of two cases is taken within each pass (the cases compared
are measured seconds apart) and reported as the median of the passes' ratios.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from serving.bench.grid import Cell, Part, require_model
from serving.bench.host import Host, HostSpec, hosting, runner_config
from serving.bench.load import run_load
from serving.bench.report import pyplot, save
from serving.bench.run import Probe, median_row, per_1k
from serving.bench.targets import Check
from serving.bench.versions_grid import BOTH, VersionsOptions, VersionsRow
from serving.bench.wire import Job

MODEL = "bench"  # the model's name in the repositories
_COST = 0.95  # two busy versions: at least this share of one version's timesteps/s


@dataclass(frozen=True)
class Case:
    """One measurement: its parts, against the server of `served` versions (1 or 2)."""

    name: str
    served: int
    parts: tuple[Part, ...]


def plan_versions(options: VersionsOptions) -> list[Case]:
    """Every case at each chunk length, the four of one length next to each other."""
    n, channels = options.sessions, options.channels
    cases: list[Case] = []
    for steps in options.chunk_steps:
        full = _part(n, steps, channels, "1")
        halves = (_part(n // 2, steps, channels // 2, "1"), _part(n - n // 2, steps, channels // 2, "2"))
        small = _part(options.small_sessions, steps, channels, "2", options.small_period_ms / 1000)
        cases += [
            Case("one_version", 1, (full,)),
            Case("two_busy", 2, halves),
            Case("small_alone", 2, (small,)),
            Case("small_busy", 2, (full, small)),
        ]
    return cases


def _part(sessions: int, steps: int, channels: int, version: str, period_s: float = 0.0) -> Part:
    return Part(Cell("batched", sessions, steps, 0, max(1, min(channels, sessions))), version, period_s)


@dataclass(frozen=True)
class VersionsRun:
    """Each pass's rows, in the order measured (the same in every pass)."""

    passes: list[list[VersionsRow]]

    @property
    def rows(self) -> list[VersionsRow]:
        """Each row's median over the passes."""
        return [median_row(same) for same in zip(*self.passes, strict=True)]

    def paired(self, ratio: Callable[[Sequence[VersionsRow], int], float | None], steps: int) -> list[float]:
        """`ratio` of each pass's rows at `steps`-step chunks (the passes that have it)."""
        return [value for rows in self.passes if (value := ratio(rows, steps)) is not None]


def run_versions(
    options: VersionsOptions, on_row: Callable[[VersionsRow], None] | None = None
) -> VersionsRun:
    """Measure every case `options.repeats` times, alternated: a row per part of a case (and one summing a
    case of two parts) in each pass. `on_row` sees each row once measured."""
    require_model(options.model_dir)
    cases = plan_versions(options)
    passes: list[list[VersionsRow]] = []
    with ExitStack() as stack:
        hosts = {served: stack.enter_context(_serving(options, served)) for served in (1, 2)}
        for _ in range(options.repeats):
            passes.append([])
            for case in cases:
                for row in measure_case(case, hosts[case.served], options):
                    passes[-1].append(row)
                    if on_row is not None:
                        on_row(row)
    return VersionsRun(passes)


@contextmanager
def _serving(options: VersionsOptions, versions: int) -> Iterator[Host]:
    """A server process of a repository that publishes the artifact as versions 1 to `versions`, all
    served; the repository is removed once it has stopped."""
    with tempfile.TemporaryDirectory(prefix="conveyor-versions-") as root:
        publish(options.model_dir, Path(root), versions)
        config = {"max_batch_size": options.max_batch_size, "repository_poll_s": 3600.0}
        config |= runner_config(options.ort_threads, options.ort_parallel_calls)
        with hosting(HostSpec("repository", Path(root), config)) as host:
            yield host


def publish(artifact: Path, root: Path, versions: int) -> None:
    """Copy `artifact` into the repository `root` as versions 1 to `versions` of `MODEL`, every one served."""
    model = root / MODEL
    for number in range(1, versions + 1):
        shutil.copytree(artifact, model / str(number))
    (model / "versions.json").write_text(json.dumps({"latest": versions}) + "\n")


def measure_case(case: Case, host: Host, options: VersionsOptions) -> list[VersionsRow]:
    """One pass of `case` against `host`: a row per part, and one summing them when there are two."""
    job: Job = {
        "kind": "parts",
        "parts": [asdict(part) for part in case.parts],
        "target": host.target,
        "warmup_s": options.warmup_s,
        "seconds": options.seconds,
        "frames_in_flight": 1,
    }
    probe = Probe(host)
    result = run_load(job, probe.start, probe.stop)
    if len(case.parts) == 1:
        return [_row(case.name, case.parts[0], result, probe)]
    rows = [
        _row(case.name, part, figures, None)
        for part, figures in zip(case.parts, result["parts"], strict=True)
    ]
    sessions = sum(part.cell.sessions for part in case.parts)
    both = replace(case.parts[0], cell=replace(case.parts[0].cell, sessions=sessions), version=BOTH)
    return [*rows, _row(case.name, both, result, probe)]


def _row(case: str, part: Part, result: Job, probe: Probe | None) -> VersionsRow:
    """A part's row from its figures; with `probe`, the case's server CPU and batches (and the load's CPU)."""
    steps, seconds = result["steps"], result["seconds"]
    return VersionsRow(
        case=case,
        version=part.version,
        sessions=part.cell.sessions,
        chunk_steps=part.cell.chunk_steps,
        period_ms=part.period_s * 1000 if part.period_s else None,
        timesteps_per_s=steps / seconds,
        chunks_per_s=result["chunks"] / seconds,
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        cpu_s_per_1k_steps=None if probe is None else per_1k(probe.server_cpu_s(), steps),
        load_cpu_s_per_1k_steps=None if probe is None else per_1k(result["cpu_s"], steps),
        mean_batch=None if probe is None else probe.mean_batch(),
        chunks=result["chunks"],
        seconds=seconds,
    )


def _find(rows: Sequence[VersionsRow], case: str, steps: int, version: str) -> VersionsRow | None:
    return next((r for r in rows if (r.case, r.chunk_steps, r.version) == (case, steps, version)), None)


def cost_ratio(rows: Sequence[VersionsRow], steps: int) -> float | None:
    """Two busy versions' timesteps/s together over one version's, at `steps`-step chunks."""
    one, two = _find(rows, "one_version", steps, "1"), _find(rows, "two_busy", steps, BOTH)
    return None if one is None or two is None else two.timesteps_per_s / one.timesteps_per_s


def small_p99s(rows: Sequence[VersionsRow], steps: int) -> tuple[float | None, float | None, float | None]:
    """At `steps`-step chunks, p99 ms: the small version's alone, the small version's beside the busy one,
    and the busy one's own."""
    found = [
        _find(rows, case, steps, v)
        for case, v in (("small_alone", "2"), ("small_busy", "2"), ("small_busy", "1"))
    ]
    alone, beside, busy = (None if row is None else row.p99_ms for row in found)
    return alone, beside, busy


def starved(rows: Sequence[VersionsRow], steps: int) -> float | None:
    """The small version's p99 beside the busy one over the busy one's own: above 1, its few chunks wait
    longer than the busy version's many."""
    _, beside, busy = small_p99s(rows, steps)
    return None if beside is None or busy is None else beside / busy


def check_versions(run: VersionsRun, options: VersionsOptions) -> list[Check]:
    """At each chunk length, the median of the passes' ratios: two busy versions cost at most 5% of one's
    timesteps/s, and the small version is not starved by the busy one (its p99 no longer than the busy
    version's own)."""
    checks: list[Check] = []
    for steps in options.chunk_steps:
        checks += [
            Check(
                f"{steps}-step chunks: two busy versions / one version steps/s",
                _median(run.paired(cost_ratio, steps)),
                _COST,
                True,
            ),
            Check(
                f"{steps}-step chunks: small version's p99 beside a busy one / the busy one's p99",
                _median(run.paired(starved, steps)),
                1,
                False,
            ),
        ]
    return checks


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(run: VersionsRun, options: VersionsOptions) -> str:
    """The ratio (each pass's) and the p99s (medians), a line per chunk length."""
    lines = []
    for steps in options.chunk_steps:
        ratios = ", ".join(f"{ratio:.3f}" for ratio in run.paired(cost_ratio, steps))
        alone, beside, busy = (_text(p99, ".2f") for p99 in small_p99s(run.rows, steps))
        lines.append(
            f"{steps}-step chunks: two busy versions / one version timesteps/s, each pass: {ratios}; small "
            f"version ({options.small_sessions} sessions, a chunk every {options.small_period_ms:g} ms) "
            f"p99 {alone} ms alone, {beside} ms beside {options.sessions} busy sessions (theirs {busy} ms)"
        )
    return "\n".join(lines)


def _text(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def plot_versions(rows: Sequence[VersionsRow], path: Path, options: VersionsOptions) -> None:
    """Per chunk length: timesteps/s of one version and of two busy ones (each version's share stacked), and
    the p99s of the small version alone, of the small version beside the busy one, and of the busy one."""
    plt = pyplot()
    lengths = options.chunk_steps
    figure, axes = plt.subplots(len(lengths), 2, figsize=(12, 4.5 * len(lengths)), squeeze=False)
    for (throughput, latency), steps in zip(axes, lengths, strict=True):
        for x, case in enumerate(("one_version", "two_busy")):
            bottom = 0.0
            for version, color in (("1", "C0"), ("2", "C1")):
                row = _find(rows, case, steps, version)
                value = 0.0 if row is None else row.timesteps_per_s
                label = f"v{version}" if x == 1 else None
                throughput.bar(x, value, bottom=bottom, color=color, label=label)
                bottom += value
        throughput.set(xticks=[0, 1], xticklabels=["one version", "two busy versions"], ylabel="timesteps/s")
        throughput.set_title(f"{steps}-step chunks, {options.sessions} sessions at full load")
        throughput.legend(fontsize=8)
        latency.bar([0, 1, 2], [_nan(p99) for p99 in small_p99s(rows, steps)], color=["C1", "C3", "C0"])
        latency.axhline(options.small_period_ms, color="grey", linestyle="--", label="the small one's pace")
        names = ["small v2 alone", "small v2 beside busy v1", "busy v1"]
        latency.set(xticks=[0, 1, 2], xticklabels=names, ylabel="p99 chunk latency (ms)")
        latency.set_title(f"small version: {options.small_sessions} sessions, paced")
        latency.legend(fontsize=8)
    save(figure, path)
