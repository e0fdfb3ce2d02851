"""Write docs/examples/readings.csv, the README's example of `conveyor train --data`: machines' sensor
readings in long format (one row per step), each machine's run labelled with its condition.

    python scripts/example_readings.py [OUT.csv]

Three channels (vibration, temperature, current), runs of 20-60 steps, three conditions: healthy;
bearing_wear (vibration bursts every few steps); overheating (temperature climbing through the run). Seeded,
so the committed file is what this script writes.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

CONDITIONS = ("healthy", "bearing_wear", "overheating")
MACHINES = 150
DEFAULT_OUT = Path("docs/examples/readings.csv")


def run(condition: str, steps: int, rng: np.random.Generator) -> np.ndarray:
    """One machine's [steps, 3] readings under `condition`."""
    vibration = 0.2 + 0.05 * rng.standard_normal(steps)
    temperature = 40 + rng.normal(0, 0.5, steps).cumsum() * 0.2
    current = 3 + 0.1 * rng.standard_normal(steps)
    if condition == "bearing_wear":
        period = int(rng.integers(4, 8))
        vibration[int(rng.integers(period)) :: period] += rng.uniform(0.3, 0.6)
    elif condition == "overheating":
        temperature += np.linspace(0, rng.uniform(4, 8), steps)
        current += np.linspace(0, 0.4, steps)
    return np.stack([vibration, temperature, current], axis=1)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    with out.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["sequence", "step", "vibration", "temperature", "current", "target"])
        for machine in range(MACHINES):
            condition = CONDITIONS[machine % len(CONDITIONS)]
            readings = run(condition, int(rng.integers(20, 61)), rng)
            for step, values in enumerate(readings):
                writer.writerow([f"m{machine:03d}", step, *(f"{v:.3f}" for v in values), condition])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
