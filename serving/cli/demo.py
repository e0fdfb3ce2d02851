"""`conveyor demo`: the LSTM notes' story, "i grew up in france . ... i speak fluent french", over real gRPC.

It starts a server in this process on free ports, then streams one session over several calls, each on a new
connection, so that the only thing linking "france" to the prediction after "fluent" is the cell state the
server carried between calls. A fresh session then asks the same last question without that memory. Last, a
latency summary read from the server's /metrics, and a clean shutdown.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
from prometheus_client import CollectorRegistry

from serving.cli.stream import StreamError, encode_text, top_k
from serving.client import ConveyorClient, ConveyorError, ModelInfo, Outputs
from serving.client.scrape import scrape
from serving.domain.errors import ModelLoadError
from serving.server.app import build_server
from serving.server.config import ServerConfig

OPENING = "i grew up in france ."
# One call each: words of the language task's filler vocabulary, none of the sentence frame ("i", "in", ...).
FILLER = (
    "later we moved to the city and my father found a new job there",
    "every summer we visited my grandmother and her old dog near the sea",
    "one year later my sister taught music to children from the city school",
)
QUESTION = "i speak fluent"
CALLS = 1 + len(FILLER) + 1  # the remembering session's calls: opening, filler, question
SERVER_GRACE_S = 2.0


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """Where the language model lives; trained and exported there when missing."""

    artifacts: Path = Path("artifacts")
    model: str = "language"
    train_max_steps: int | None = None  # None: the training defaults (minutes); tests pass a few steps


@dataclass(frozen=True)
class Prediction:
    """The most probable next word and its probability, plus the probability of the remembered answer."""

    word: str
    probability: float
    probability_of_answer: float


@dataclass(frozen=True)
class Latency:
    """Per-chunk figures from the server's /metrics."""

    chunks: int
    p50_s: float
    p99_s: float
    mean_inference_s: float


@dataclass(frozen=True)
class DemoResult:
    """What the story showed."""

    session_id: str
    connections: int  # calls of the remembering session, each on its own connection
    remembered: Prediction  # after "i speak fluent", with the carried state
    fresh: Prediction  # the same question on a fresh session
    latency: Latency


def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Tell the story through an in-process server on free ports; raises DemoError when it cannot."""
    out = out or sys.stdout
    directory = options.artifacts / options.model
    ensure_artifact(directory, options, out)
    config = ServerConfig(model_dir=directory, port=0, metrics_port=0)
    try:
        server = build_server(config, registry=CollectorRegistry())
    except (ModelLoadError, OSError) as exc:
        raise DemoError(f"cannot start the server: {exc}") from None
    try:
        target = f"127.0.0.1:{server.port}"
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        info = _describe_model(target, metrics_url, out)
        remembered, fresh, session_id = _tell_story(target, info, out)
        latency = read_latency(metrics_url)
    except (ConveyorError, StreamError) as exc:
        raise DemoError(f"the story failed: {exc}") from None
    finally:
        server.stop(SERVER_GRACE_S)
    _print_latency(latency, out)
    print("server stopped", file=out)
    return DemoResult(session_id, CALLS, remembered, fresh, latency)


def ensure_artifact(directory: Path, options: DemoOptions, out: TextIO) -> None:
    """Train and export the language model into `directory` unless its model.onnx is there already."""
    if (directory / "model.onnx").is_file():
        return
    print(f"no model at {directory}: training and exporting one first", file=out)
    try:
        from export import ExportError, export_artifact
        from training.loop import FitOptions
        from training.train import TrainOptions, train
    except ImportError as exc:
        raise DemoError(f"training needs the train extra (pip install -e '.[train]'): {exc}") from None
    fit = FitOptions()
    if options.train_max_steps is not None:
        fit = replace(fit, max_steps=options.train_max_steps)
    try:
        train("language", directory, TrainOptions(fit=fit))
        export_artifact(directory)
    except (ExportError, OSError) as exc:
        raise DemoError(f"cannot make the language model: {exc}") from None


def read_latency(metrics_url: str) -> Latency:
    """Chunk count, p50/p99 chunk latency (interpolated in the histogram's buckets), mean inference time."""
    metrics = scrape(metrics_url)
    latency = "conveyor_chunk_latency_seconds"
    inferences = metrics.total("conveyor_inference_seconds_count")
    mean_inference_s = metrics.total("conveyor_inference_seconds_sum") / max(inferences, 1.0)
    return Latency(
        int(metrics.total(f"{latency}_count")),
        metrics.quantile(latency, 0.5),
        metrics.quantile(latency, 0.99),
        mean_inference_s,
    )


def _describe_model(target: str, metrics_url: str, out: TextIO) -> ModelInfo:
    with ConveyorClient(target) as client:
        client.wait_for_ready(timeout_s=10)
        info = client.model_info()
    if not info.takes_tokens or not info.vocabulary:
        raise DemoError(f"the demo needs the language model; {info.name!r} is a {info.input_kind} model")
    print(f"model   {info.name}: LSTM {info.layers} x {info.hidden}, {len(info.vocabulary)} words", file=out)
    print(f"        fingerprint {info.fingerprint[:16]}", file=out)
    print(f"server  {target} (gRPC), {metrics_url}", file=out)
    return info


def _tell_story(target: str, info: ModelInfo, out: TextIO) -> tuple[Prediction, Prediction, str]:
    print(
        f"\none session, {CALLS} calls, each on a new connection; the server keeps (h, c):",
        file=out,
    )
    session_id, offset = "", 0
    for number, text in enumerate((OPENING, *FILLER), start=1):
        session_id, steps, _ = _call(target, info, text, session_id, offset)
        note = f"[session {session_id}, issued by the server]" if number == 1 else ""
        _print_call(out, number, (offset, steps), text, note)
        offset = steps
    _, steps, logits = _call(target, info, QUESTION, session_id, offset, end=True)
    remembered = _prediction(logits, info)
    answer = remembered.word
    _print_call(out, CALLS, (offset, steps), QUESTION, _shown(remembered))

    print("\nthe same question on a fresh session that never saw call 1:", file=out)
    _, steps, logits = _call(target, info, QUESTION, "", 0, end=True)
    fresh = _prediction(logits, info, answer)
    _print_call(out, CALLS + 1, (0, steps), QUESTION, _shown(fresh, answer))
    print(
        f"\nwith the cell state carried across {CALLS} connections, {answer!r} has "
        f"p = {remembered.probability:.3f}; without it, p = {fresh.probability_of_answer:.3f}",
        file=out,
    )
    return remembered, fresh, session_id


def _call(
    target: str, info: ModelInfo, text: str, session_id: str, offset: int, end: bool = False
) -> tuple[str, int, np.ndarray]:
    """One call on a new connection: start a session (no id) or go on with `session_id` at `offset`."""
    with ConveyorClient(target) as client:
        session = (
            client.attach(session_id, offset, outputs=Outputs.LAST)
            if session_id
            else client.session(outputs=Outputs.LAST)
        )
        logits = session.send(encode_text(text, info.vocabulary), end=end)
        return session.session_id or "", session.offset, logits[-1]


def _prediction(logits: np.ndarray, info: ModelInfo, answer: str | None = None) -> Prediction:
    """The top word, and the probability of `answer` (by default the top word itself)."""
    ranked = dict(top_k(logits, info.output_labels, len(info.output_labels)))
    word, probability = next(iter(ranked.items()))
    return Prediction(word, probability, ranked.get(answer or word, 0.0))


def _shown(prediction: Prediction, answer: str | None = None) -> str:
    shown = f"-> {prediction.word} (p = {prediction.probability:.3f})"
    if answer is not None and answer != prediction.word:
        shown += f", {answer} p = {prediction.probability_of_answer:.3f}"
    return shown


def _print_call(out: TextIO, number: int, steps: tuple[int, int], text: str, note: str) -> None:
    span = f"{steps[0]}-{steps[1] - 1}"
    print(f"  call {number}  steps {span:>5}  {text}   {note}".rstrip(), file=out)


def _print_latency(latency: Latency, out: TextIO) -> None:
    print(
        f"\nlatency (server /metrics): {latency.chunks} chunks, p50 ~ {latency.p50_s * 1e3:.2f} ms, "
        f"p99 ~ {latency.p99_s * 1e3:.2f} ms, mean inference {latency.mean_inference_s * 1e3:.3f} ms",
        file=out,
    )
