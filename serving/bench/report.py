"""A bench run's rows as a table on stdout, a JSON list, and a PNG plot (matplotlib, imported to plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from serving.bench.audio_grid import Column
from serving.bench.grid import Row


class Tabular(Protocol):
    """A row of a table: the grid's `Row`, or the audio rows' `AudioRow`."""

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object, keyed as its table's columns."""


# (row key, title, width, format suffix); the first column is left-aligned, the rest right.
ROW_COLUMNS: tuple[Column, ...] = (
    ("mode", "mode", 10, ""),
    ("sessions", "sessions", 8, "d"),
    ("chunk_steps", "chunk", 5, "d"),
    ("history_steps", "history", 7, "d"),
    ("channels", "chan", 4, "d"),
    ("timesteps_per_s", "steps/s", 9, ".0f"),
    ("chunks_per_s", "chunks/s", 9, ".0f"),
    ("p50_ms", "p50 ms", 7, ".3f"),
    ("p99_ms", "p99 ms", 7, ".3f"),
    ("cpu_s_per_1k_steps", "srv cpu/1k", 10, ".4f"),
    ("load_cpu_s_per_1k_steps", "load cpu/1k", 11, ".4f"),
    ("mean_batch", "batch", 6, ".1f"),
)


def format_table(rows: Sequence[Tabular], columns: Sequence[Column] = ROW_COLUMNS) -> str:
    """A fixed-width table: one line per row (the grid's CPU columns in CPU seconds per 1000 timesteps)."""
    header = " ".join(_align(i, title, width) for i, (_, title, width, _) in enumerate(columns))
    return "\n".join([header, *(format_row(row, columns) for row in rows)])


def format_row(row: Tabular, columns: Sequence[Column] = ROW_COLUMNS) -> str:
    """One line of the table; `-` where a figure is missing, yes or no for a flag."""
    values = row.to_json()
    cells = []
    for i, (key, _, width, suffix) in enumerate(columns):
        value = values[key]
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        text = "-" if missing else format(value, suffix)
        cells.append(_align(i, ("yes" if value else "no") if isinstance(value, bool) else text, width))
    return " ".join(cells).rstrip()  # a last column of text (the audio rows' note) may be empty


def _align(index: int, text: str, width: int) -> str:
    return text.ljust(width) if index == 0 else text.rjust(width)


def write_json(rows: Sequence[Tabular], path: Path) -> None:
    """The rows as a JSON list of objects (NaN and missing figures as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [{k: _finite(v) for k, v in row.to_json().items()} for row in rows]
    path.write_text(json.dumps(data, indent=2) + "\n")


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot(rows: Sequence[Row], path: Path) -> None:
    """Throughput, p99 latency and server CPU per 1000 timesteps against sessions: a row of panels per chunk
    length, one line per mode."""
    plt = pyplot()
    lengths = sorted({row.chunk_steps for row in rows})
    colors = {label: f"C{i % 10}" for i, label in enumerate(_series(rows))}  # a mode's color in every panel
    figure, axes = plt.subplots(len(lengths), 3, figsize=(18, 4.5 * len(lengths)), squeeze=False)
    for (throughput, latency, cpu), length in zip(axes, lengths, strict=True):
        for label, series in _series([row for row in rows if row.chunk_steps == length]).items():
            sessions = [row.sessions for row in series]
            marker = "o-" if len(series) > 1 else "s"
            cpu_s = [math.nan if row.cpu_s_per_1k_steps is None else row.cpu_s_per_1k_steps for row in series]
            for axis, values in (
                (throughput, [row.timesteps_per_s for row in series]),
                (latency, [row.p99_ms for row in series]),
                (cpu, cpu_s),
            ):
                axis.plot(sessions, values, marker, label=label, color=colors[label])
        panels = (
            (throughput, "timesteps/s"),
            (latency, "p99 chunk latency (ms)"),
            (cpu, "server CPU s per 1000 timesteps"),
        )
        for axis, what in panels:
            axis.set(
                xscale="log", yscale="log", xlabel="sessions", ylabel=what, title=f"{length}-step chunks"
            )
            axis.grid(True, which="both", alpha=0.3)
        throughput.legend(fontsize=8)
    save(figure, path)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (imported here: only a plot needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure: Any, path: Path) -> None:
    """Write `figure` as a PNG at `path`, and free it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def _series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    series: dict[str, list[Row]] = {}
    for row in sorted(rows, key=lambda r: r.sessions):
        label = f"{row.mode} (history {row.history_steps})" if row.history_steps else row.mode
        series.setdefault(label, []).append(row)
    return series
