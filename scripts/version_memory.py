"""What one more loaded model version costs a server in resident memory: `conveyor serve --models` processes
holding 1, 2 and 3 versions of each artifact, their RSS once SERVING (and idle), and the cost per version.

    .venv/bin/python scripts/version_memory.py artifacts/language artifacts/sensor-h256

Each version is a copy of the artifact, published as the bench's `--versions` publishes it (its own ONNX
Runtime session, store and batch queue, as a rollout holds them); the table is markdown, as
docs/repository.md shows it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.bench.versions import publish
from serving.client import ConveyorClient

VERSIONS = (1, 2, 3)
_SETTLE_S = 2.0  # after SERVING: warm-up allocations done


def rss_serving(root: Path) -> int:
    """The resident bytes of a server of the repository `root`, once it is SERVING and has settled."""
    port = _free_port()
    command = [sys.executable, "-m", "serving.cli", "serve", "--models", str(root), "--port", str(port)]
    env = {**os.environ, "CONVEYOR_METRICS_PORT": str(_free_port())}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with ConveyorClient(f"127.0.0.1:{port}") as client:
            client.wait_for_ready(timeout_s=120)
        time.sleep(_SETTLE_S)
        pages = int(Path(f"/proc/{process.pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    finally:
        process.kill()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path, help="exported artifact directories")
    args = parser.parse_args()
    print("| model | model.onnx | " + " | ".join(f"RSS, {n} loaded" for n in VERSIONS) + " | per version |")
    print("|---|---|" + "---|" * len(VERSIONS) + "---|")
    for artifact in args.artifacts:
        rss = []
        for versions in VERSIONS:
            with tempfile.TemporaryDirectory() as scratch:
                publish(artifact, Path(scratch), versions)
                rss.append(rss_serving(Path(scratch)))
        per_version = (rss[-1] - rss[0]) / (VERSIONS[-1] - VERSIONS[0])
        onnx = (artifact / "model.onnx").stat().st_size
        cells = " | ".join(f"{value / 2**20:.0f} MiB" for value in rss)
        print(f"| {artifact.name} | {onnx / 2**20:.2f} MiB | {cells} | {per_version / 2**20:.1f} MiB |")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    main()
