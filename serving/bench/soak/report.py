"""A soak's report: the table a person reads (also saved as text), the JSON, and the plot of the server's
resident memory and the answers over the run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serving.bench.soak.cases import AFTER_END, CASES
from serving.bench.soak.run import SoakResult
from serving.bench.soak.tally import Tally

_DUE = {case.name: case.code for case in (*CASES, AFTER_END)}
_MB = 1e6


def format_report(result: SoakResult) -> str:
    """The whole report as fixed-width text: traffic, answers by code, bad requests, memory, verdict."""
    sections = [_header(result), _traffic(result.tally), _codes(result.tally), _bad(result.tally)]
    sections += [_memory(result), _failures(result.tally), result.verdict()]
    return "\n\n".join(section for section in sections if section)


def _header(result: SoakResult) -> str:
    info, options = result.info, result.options
    where = f"the server at {options.target}" if options.target else "its own server"
    return (
        f"soak: {result.seconds / 60:.1f} min against {where}, model {info.name} (LSTM {info.layers} x "
        f"{info.hidden}, {info.input_kind}), idle TTL {info.idle_ttl_s:g} s\n"
        f"{options.sessions} sessions at a time over {options.connections} shared connections, "
        f"{options.think_ms:g} ms mean pause between a session's requests"
    )


def _traffic(tally: Tally) -> str:
    kinds, checks = tally.kinds, tally.checks
    rows = [
        ("sessions opened (ids issued by the server)", f"{_opened(tally)} ({kinds['opened, id issued']})"),
        (
            "chunk requests over Stream / Frames / Step",
            f"{kinds['via Stream']} / {kinds['via Frames']} / {kinds['via Step']}",
        ),
        ("timesteps applied", f"{kinds['timesteps']}"),
        ("idle pauses (under the TTL)", f"{kinds['idle']}"),
        ("reconnects (a new connection, same session)", f"{kinds['reconnect']}"),
        ("retries / answered as identical replays", f"{kinds['retry']} / {checks[('replay', True)]}"),
        ("ended by their last chunk / by EndSession", f"{kinds['end flag']} / {kinds['EndSession']}"),
        (
            "left to expire / NOT_FOUND after the TTL",
            f"{kinds['expiry']} / {_answered(tally, 'after expiry')}",
        ),
        ("bad requests", f"{kinds['bad']}"),
        (
            "sessions checked against a one-chunk run / equal",
            f"{_checked(tally)} / {checks[('outputs', True)]}",
        ),
        ("largest scaled difference from a one-chunk run", f"{tally.max_diff:.1e}"),
    ]
    return "traffic\n" + "\n".join(f"  {name:<50} {value:>16}" for name, value in rows)


def _opened(tally: Tally) -> int:
    return tally.kinds["opened"] + tally.kinds["opened, id issued"]


def _checked(tally: Tally) -> int:
    return tally.checks[("outputs", True)] + tally.checks[("outputs", False)]


def _answered(tally: Tally, kind: str) -> int:
    return sum(n for (k, _, expected), n in tally.answers.items() if k == kind and expected)


def _codes(tally: Tally) -> str:
    lines = [f"{'answers by code':<24} {'expected':>10} {'unexpected':>10}"]
    lines += [
        f"  {code:<22} {n['expected']:>10} {n['unexpected']:>10}" for code, n in tally.by_code().items()
    ]
    failed = sum(n for (_, passed), n in tally.checks.items() if not passed)
    lines.append(f"  {'failed checks':<22} {'':>10} {failed:>10}")
    return "\n".join(lines)


def _bad(tally: Tally) -> str:
    lines = [f"{'bad requests':<40} {'code due':<18} {'sent':>6} {'got it':>6}"]
    sent = tally.by_kind("bad: ")
    for case, due in _DUE.items():
        codes = sent.get(case, {})
        lines.append(f"  {case:<38} {due:<18} {sum(codes.values()):>6} {codes.get(due, 0):>6}")
    return "\n".join(lines)


def _memory(result: SoakResult) -> str:
    memory, limit = result.memory, result.options.max_drift_pct
    rows = [
        ("before any traffic", f"{memory.at_start / _MB:.1f} MB"),
        (f"at the warm-up's end ({memory.warmup_s:g} s)", f"{memory.at_warmup / _MB:.1f} MB"),
        ("most after the warm-up", f"{memory.max_after / _MB:.1f} MB"),
        ("at the end", f"{memory.last / _MB:.1f} MB"),
        (f"drift after the warm-up (limit {limit:g}%)", f"{memory.drift_pct:+.1f}%"),
        ("trend after the warm-up", f"{memory.slope_mb_per_min:+.2f} MB/min"),
    ]
    title = f"server resident memory ({len(memory.samples)} samples, every {result.options.sample_s:g} s)"
    return title + "\n" + "\n".join(f"  {name:<50} {value:>16}" for name, value in rows)


def _failures(tally: Tally) -> str:
    if not tally.failures:
        return ""
    shown = len(tally.failures)
    return f"unexpected (the first {shown}):\n" + "\n".join(f"  {line}" for line in tally.failures)


def to_json(result: SoakResult) -> dict[str, Any]:
    """The report's figures, the memory samples and the answers over time, as one JSON object."""
    tally, memory = result.tally, result.memory
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result.options).items()}
    checks: dict[str, dict[str, int]] = {}
    for (name, passed), n in tally.checks.items():
        checks.setdefault(name, {"passed": 0, "failed": 0})["passed" if passed else "failed"] += n
    return {
        "passed": result.passed,
        "seconds": result.seconds,
        "options": options | {"warmup_s": memory.warmup_s},
        "model": asdict(result.info),
        "traffic": dict(tally.kinds),
        "answers_by_code": tally.by_code(),
        "answers_by_kind": tally.by_kind(""),
        "bad_requests": {
            case: {"due": _DUE[case], "answers": codes} for case, codes in tally.by_kind("bad: ").items()
        },
        "checks": checks,
        "max_scaled_difference": tally.max_diff,
        "unexpected": tally.unexpected,
        "failures": tally.failures,
        "memory": {
            "at_start_bytes": memory.at_start,
            "at_warmup_bytes": memory.at_warmup,
            "max_after_warmup_bytes": memory.max_after,
            "last_bytes": memory.last,
            "drift_pct": memory.drift_pct,
            "slope_mb_per_min": memory.slope_mb_per_min,
            "samples": [list(sample) for sample in memory.samples],
        },
        "answers_per_s": tally.series(result.seconds),
    }


def write_json(result: SoakResult, path: Path) -> None:
    """`to_json` written to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result), indent=2) + "\n")


def plot(result: SoakResult, path: Path) -> None:
    """Two panels over the run: the server's resident memory (warm-up shaded, the allowed drift dashed), and
    answers per second (OK, expected errors, unexpected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory, limit = result.memory, result.options.max_drift_pct
    figure, (rss, rates) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    times, sizes = zip(*memory.samples, strict=True)
    rss.plot([t / 60 for t in times], [b / _MB for b in sizes], "o-", markersize=3, label="server RSS")
    rss.axvspan(0, memory.warmup_s / 60, color="grey", alpha=0.15, label="warm-up")
    rss.axhline(memory.at_warmup / _MB, color="green", linewidth=1, label="at the warm-up's end")
    rss.axhline(memory.at_warmup * (1 + limit / 100) / _MB, color="red", linestyle="--", label=f"+{limit:g}%")
    rss.set(ylabel="resident memory (MB)", title=f"conveyor soak, {result.info.name}: {result.verdict()}")
    rss.set_ylim(bottom=0)
    series = result.tally.series(result.seconds)
    minutes = [point["t_s"] / 60 for point in series]
    for key, color in (("ok", "tab:blue"), ("expected error", "tab:orange"), ("unexpected", "tab:red")):
        rates.plot(minutes, [point[key] for point in series], color=color, label=key)
    # A few unexpected answers in minutes of traffic would vanish into the axis: mark each bucket with any.
    marked = [
        (m, point["unexpected"]) for m, point in zip(minutes, series, strict=True) if point["unexpected"]
    ]
    rates.plot([m for m, _ in marked], [rate for _, rate in marked], "x", color="tab:red", markersize=7)
    rates.set(xlabel="minutes", ylabel="answers per second")
    for axis in (rss, rates):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
