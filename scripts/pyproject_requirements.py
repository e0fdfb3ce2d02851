"""Print the requirements of pyproject.toml (base dependencies plus chosen extras), one per line.

The Dockerfiles install these before copying the source, so the dependency layer stays cached while the code
changes, and pyproject.toml stays the one place where versions are pinned. `--torch-local-version cpu` turns
`torch==X` into `torch==X+cpu`: the CPU-only build, whichever index or wheelhouse it comes from.

    python3 scripts/pyproject_requirements.py pyproject.toml --extra train --torch-local-version cpu
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

_TORCH_NAME = re.compile(r"^torch\s*(?:[=<>!~;\[@]|$)")
_TORCH_PIN = re.compile(r"^torch\s*==\s*([0-9][0-9A-Za-z.]*)$")


def requirements(pyproject: Path, extras: Sequence[str], torch_local_version: str | None) -> list[str]:
    """The base dependencies of `pyproject` followed by those of each extra, in order, without duplicates."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject defines {sorted(optional)}")
    found: list[str] = list(project.get("dependencies", []))
    for extra in extras:
        found.extend(optional[extra])
    if torch_local_version:
        found = [_local_torch(requirement, torch_local_version) for requirement in found]
    return list(dict.fromkeys(found))


def _local_torch(requirement: str, local_version: str) -> str:
    text = requirement.strip()
    if not _TORCH_NAME.match(text):
        return requirement
    match = _TORCH_PIN.match(text)
    if match is None:
        # An open range would let pip choose a CUDA build; the image must get exactly one CPU wheel.
        raise SystemExit(f"torch must be pinned exactly (torch==X.Y.Z) for a CPU build, got {requirement!r}")
    return f"torch=={match.group(1)}+{local_version}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group")
    parser.add_argument("--torch-local-version", help="pin torch to this local build, e.g. cpu")
    args = parser.parse_args(argv)
    found = requirements(args.pyproject, args.extra, args.torch_local_version)
    sys.stdout.write("".join(f"{line}\n" for line in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
