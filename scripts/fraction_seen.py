"""Accuracy by fraction of the sequence seen, served and streamed: a model trained by `conveyor train --data`
serves a test file's sequences, each streamed in chunks of 1-7 steps on its own session, and its prediction
after each tenth of the sequence is scored against the sequence's class.

    .venv/bin/python scripts/fraction_seen.py --model DIR [--model DIR ...] --data TEST_FILE \
        --png OUT.png [--json OUT.json]

Several models (say `--answer last` and `--answer every`) go in one plot, one line each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from serving.bench.report import pyplot, save
from serving.client import ConveyorClient
from serving.server.app import build_server
from serving.server.config import ServerConfig
from training.data import read_sequences

FRACTIONS = [round(0.1 * k, 1) for k in range(1, 11)]


def streamed_predictions(model_dir: Path, sequences: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Each sequence's predicted class at every step, as the server answered its chunks."""
    rng = np.random.default_rng(seed)
    config = ServerConfig(model_dir=model_dir, port=0, metrics_port=0)
    predicted = []
    with (
        build_server(config, CollectorRegistry()) as server,
        ConveyorClient(f"127.0.0.1:{server.port}") as client,
    ):
        for x in sequences:
            with client.session() as session:
                outputs, start = [], 0
                while start < len(x):
                    stop = min(len(x), start + int(rng.integers(1, 8)))
                    outputs.append(session.send(x[start:stop]))
                    start = stop
            predicted.append(np.concatenate(outputs).argmax(axis=-1))
    return predicted


def by_fraction(predicted: list[np.ndarray], labels: np.ndarray) -> dict[float, float]:
    """Accuracy of the prediction after the first ceil(f * T) steps of each sequence, for each fraction f."""
    figures = {}
    for fraction in FRACTIONS:
        hits = [
            p[max(1, math.ceil(fraction * len(p))) - 1] == label
            for p, label in zip(predicted, labels, strict=True)
        ]
        figures[fraction] = float(np.mean(hits))
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="the test file (classification per sequence)"
    )
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    test = read_sequences(args.data)
    assert test.classes is not None and not test.per_step, "a per-sequence classification file"
    results = {}
    for model_dir in args.model:
        card = json.loads((model_dir / "model.json").read_text())
        classes = card["output"]["labels"]  # the model's class order: the training file's classes
        labels = np.array([classes.index(test.classes[int(t[0])]) for t in test.targets])
        results[model_dir.name] = by_fraction(streamed_predictions(model_dir, test.sequences), labels)
        print(model_dir.name, " ".join(f"{f:.0%} {a:.3f}" for f, a in results[model_dir.name].items()))
    plot(results, args.png, args.data.stem)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def plot(results: dict[str, dict[float, float]], path: Path, title: str) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, figures in results.items():
        axis.plot([100 * f for f in figures], list(figures.values()), "o-", label=name)
    axis.set(
        xlabel="% of the sequence seen", ylabel="accuracy (served, streamed)", ylim=(0, 1.02), title=title
    )
    axis.grid(alpha=0.3)
    axis.legend()
    save(figure, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
