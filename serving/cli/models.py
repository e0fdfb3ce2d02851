"""`conveyor models`: the models a server holds, each version with its state, labels and live sessions."""

from __future__ import annotations

import sys
from typing import TextIO

from serving.client import ClientOptions, ConveyorClient, ModelVersion

_COLUMNS = ("model", "version", "state", "labels", "sessions", "fingerprint")


def list_models(target: str, token: str | None = None, out: TextIO | None = None) -> list[ModelVersion]:
    """Print the server's model versions as a table (a failed version's reason under it); raises
    `ConveyorError` when the server cannot be asked."""
    out = out or sys.stdout
    with ConveyorClient(target, ClientOptions(token=token)) as client:
        versions = client.models()
    rows = [_row(version) for version in versions]
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)).rstrip(), file=out)
    for version, row in zip(versions, rows, strict=True):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if version.message:
            print(f"  {version.message}", file=out)
    return versions


def _row(version: ModelVersion) -> tuple[str, ...]:
    labels = ",".join(version.labels) or "-"
    return (
        version.model,
        str(version.version),
        version.state,
        labels,
        str(version.sessions),
        version.fingerprint[:12],
    )
