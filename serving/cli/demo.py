"""`conveyor demo`: the LSTM notes' story, "i grew up in france . ... i speak fluent french", over real gRPC.

It starts one server in this process on free ports, serving both of its models, the LSTM and a plain RNN, from
a model repository of links to their artifact directories; every request names its model. It streams one
session of the LSTM over several calls, each on a new connection, so that the only thing linking "france" to
the prediction after "fluent" is the cell state the server carried between calls. A fresh session then asks
the same last question without that memory. Then the same calls to the plain RNN, which carries the country
over a short gap (asked right after "france") but loses it over the story's long one: the two models'
p(french) side by side. One story is one draw, so both models then answer many held-out sentences at both
gaps, streamed through the server (`serving.cli.demo_contrast`): the accuracies the claim rests on. Last, a
summary of the LSTM's chunk latency read from the server's /metrics, and a clean shutdown.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from prometheus_client import CollectorRegistry

from serving.cli.demo_contrast import (
    CONNECTIONS,
    MAX_CHUNK_WORDS,
    SENTENCES,
    GapAccuracy,
    Sentence,
    held_out_sentences,
    streamed_accuracy,
)
from serving.cli.demo_models import LSTM_RECIPE, RNN_RECIPE, DemoModelError, ensure_model
from serving.cli.stream import StreamError, encode_text, top_k
from serving.client import ClientOptions, ConveyorClient, ConveyorError, ModelInfo, ModelVersion, Outputs
from serving.client.scrape import Scrape, scrape
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
SHORT = f"{OPENING} {QUESTION}"  # the same question a few words after "france"
# Words between "france" and "fluent": the opening's ".", the filler, then "i speak".
LONG_GAP_WORDS = 1 + sum(len(text.split()) for text in FILLER) + 2
SHORT_GAP_WORDS = 1 + 2
SERVER_GRACE_S = 2.0
VERSION = "1"  # each model's one version in the demo's repository


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """Where the language model lives; trained and exported there when missing."""

    artifacts: Path = Path("artifacts")
    model: str = "language"
    rnn_model: str = "language-rnn"  # the plain RNN, trained at short gaps (RNN_TRAINING) when missing
    train_max_steps: int | None = None  # None: the training defaults (minutes); tests pass a few steps
    sentences: int = SENTENCES  # held-out sentences per gap and model in the measured contrast


@dataclass(frozen=True)
class Prediction:
    """The most probable next word and its probability, plus the probability of the remembered answer."""

    word: str
    probability: float
    probability_of_answer: float


@dataclass(frozen=True)
class Latency:
    """One model's per-chunk figures from the server's /metrics."""

    chunks: int
    p50_s: float
    p99_s: float
    mean_inference_s: float


@dataclass(frozen=True)
class Answers:
    """A model's prediction after "i speak fluent": across the story's long gap, and a few words after
    "france" (the opening and the question in one call)."""

    long_gap: Prediction
    short_gap: Prediction


@dataclass(frozen=True)
class DemoResult:
    """What the story showed."""

    session_id: str
    connections: int  # calls of the remembering session, each on its own connection
    remembered: Prediction  # after "i speak fluent", with the carried state
    fresh: Prediction  # the same question on a fresh session
    latency: Latency
    short_gap: Prediction  # the LSTM, asked right after the opening
    rnn: Answers  # the same questions to a plain RNN
    accuracy: dict[str, GapAccuracy]  # "lstm", "rnn": over `sentences` held-out sentences per gap
    sentences: int
    served: tuple[str, ...]  # the LSTM's and the RNN's "model/version", as the one server listed them


@dataclass(frozen=True)
class _Endpoint:
    """One model on the demo's server: its gRPC target, and the model every request names."""

    target: str
    model: str

    def client(self) -> ConveyorClient:
        return ConveyorClient(self.target, ClientOptions(model=self.model))


def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Tell the story through one in-process server on free ports; raises DemoError when it cannot."""
    out = out or sys.stdout
    with _serving(_ensure_models(options, out)) as (target, metrics_url):
        lstm_at, rnn_at = _Endpoint(target, options.model), _Endpoint(target, options.rnn_model)
        info = _describe_model(lstm_at, out)
        served = _describe_server(target, metrics_url, (options.model, options.rnn_model), out)
        remembered, fresh, session_id = _tell_story(lstm_at, info, out)
        short_gap = _ask_at_a_short_gap(lstm_at, info, remembered.word)
        latency = read_latency(metrics_url, options.model)  # before the RNN's first chunk
        questions = _questions(info, options.sentences)
        accuracy = {"lstm": _measure(lstm_at, questions)}
        rnn = _ask_the_rnn(rnn_at, remembered.word, out)
        accuracy["rnn"] = _measure(rnn_at, questions)
    lstm = Answers(remembered, short_gap)
    _print_side_by_side(lstm, rnn, fresh, out)
    _print_accuracy(accuracy, options.sentences, out)
    _print_latency(latency, options.model, out)
    print("server stopped", file=out)
    return DemoResult(
        session_id, CALLS, remembered, fresh, latency, short_gap, rnn, accuracy, options.sentences, served
    )


def _ensure_models(options: DemoOptions, out: TextIO) -> dict[str, Path]:
    """The LSTM's and the RNN's artifact directories by model name, each trained and exported when missing."""
    lstm_dir, rnn_dir = options.artifacts / options.model, options.artifacts / options.rnn_model
    try:
        ensure_model(lstm_dir, LSTM_RECIPE, out, options.train_max_steps)
        ensure_model(rnn_dir, RNN_RECIPE, out, options.train_max_steps)
    except DemoModelError as exc:
        raise DemoError(str(exc)) from None
    return {options.model: lstm_dir, options.rnn_model: rnn_dir}


def _questions(info: ModelInfo, sentences: int) -> tuple[list[Sentence], list[Sentence]]:
    """Held-out sentences with the story's gap, and with the short question's."""
    long_filler, short_filler = LONG_GAP_WORDS - SHORT_GAP_WORDS, 0
    return held_out_sentences(info, long_filler, sentences), held_out_sentences(info, short_filler, sentences)


def _measure(endpoint: _Endpoint, questions: tuple[list[Sentence], list[Sentence]]) -> GapAccuracy:
    long_gap, short_gap = questions
    target, model = endpoint.target, endpoint.model
    return GapAccuracy(
        streamed_accuracy(target, long_gap, model=model), streamed_accuracy(target, short_gap, model=model)
    )


@contextmanager
def _serving(models: Mapping[str, Path]) -> Iterator[tuple[str, str]]:
    """One server for `models` (name -> artifact directory) on free ports: its gRPC target and /metrics URL;
    stopped on exit. It serves them as a model repository in a temporary directory, of links to them."""
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-") as root:
        for name, directory in models.items():
            (Path(root) / name).mkdir()
            (Path(root) / name / VERSION).symlink_to(directory.resolve(), target_is_directory=True)
        config = ServerConfig(models_dir=Path(root), port=0, metrics_port=0)
        try:
            server = build_server(config, registry=CollectorRegistry())
        except (ModelLoadError, OSError) as exc:
            raise DemoError(f"cannot start the server: {exc}") from None
        try:
            yield f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.metrics_port}/metrics"
        except (ConveyorError, StreamError) as exc:
            raise DemoError(f"the story failed: {exc}") from None
        finally:
            server.stop(SERVER_GRACE_S)


def read_latency(metrics_url: str, model: str) -> Latency:
    """`model`'s chunk count and p50/p99 chunk latency (interpolated in the histogram's buckets), and the mean
    inference time, whose series is the whole server's (no model label): read before another model runs."""
    metrics = _of_model(scrape(metrics_url), model)
    latency = "conveyor_chunk_latency_seconds"
    inferences = metrics.total("conveyor_inference_seconds_count")
    mean_inference_s = metrics.total("conveyor_inference_seconds_sum") / max(inferences, 1.0)
    return Latency(
        int(metrics.total(f"{latency}_count")),
        metrics.quantile(latency, 0.5),
        metrics.quantile(latency, 0.99),
        mean_inference_s,
    )


def _of_model(metrics: Scrape, model: str) -> Scrape:
    """`metrics` without the series of other models: those labelled model=`model`, and those of no model (the
    text stays the whole scrape's)."""
    kept = tuple(sample for sample in metrics.samples if sample.labels.get("model", model) == model)
    return dataclasses.replace(metrics, samples=kept)


def _describe_model(endpoint: _Endpoint, out: TextIO) -> ModelInfo:
    with endpoint.client() as client:
        client.wait_for_ready(timeout_s=10)
        info = client.model_info()
    if not info.takes_tokens or not info.vocabulary:
        raise DemoError(f"the demo needs the language model; {info.name!r} is a {info.input_kind} model")
    print(f"model   {endpoint.model}: {_shape(info)}, {len(info.vocabulary)} words", file=out)
    print(f"        fingerprint {info.fingerprint[:16]}", file=out)
    return info


def _describe_server(target: str, metrics_url: str, names: tuple[str, ...], out: TextIO) -> tuple[str, ...]:
    """Print where the server listens and the models it serves (ListModels): each of `names` as
    "model/version"; DemoError when one of them is not ready."""
    versions = _list_models(target)
    ready = {v.model: f"{v.model}/{v.version}" for v in versions if v.state == "ready"}
    if missing := [name for name in names if name not in ready]:
        why = "; ".join(
            f"{v.model}/{v.version} {v.state}: {v.message}" for v in versions if v.model in missing
        )
        raise DemoError(f"the server does not serve {', '.join(missing)} ({why or 'not in its repository'})")
    served = tuple(ready[name] for name in names)
    print(f"server  {target} (gRPC), {metrics_url}", file=out)
    print(f"        one server for both models: {', '.join(served)} (ListModels)", file=out)
    return served


def _list_models(target: str) -> list[ModelVersion]:
    """Every model version the server holds, with its state."""
    with ConveyorClient(target) as client:
        return client.models()


def _tell_story(endpoint: _Endpoint, info: ModelInfo, out: TextIO) -> tuple[Prediction, Prediction, str]:
    print(
        f"\none session, {CALLS} calls, each on a new connection; the server keeps (h, c):",
        file=out,
    )
    session_id, offset = "", 0
    for number, text in enumerate((OPENING, *FILLER), start=1):
        session_id, steps, _ = _call(endpoint, info, text, session_id, offset)
        note = f"[session {session_id}, issued by the server]" if number == 1 else ""
        _print_call(out, number, (offset, steps), text, note)
        offset = steps
    _, steps, logits = _call(endpoint, info, QUESTION, session_id, offset, end=True)
    remembered = _prediction(logits, info)
    answer = remembered.word
    _print_call(out, CALLS, (offset, steps), QUESTION, _shown(remembered))

    print("\nthe same question on a fresh session that never saw call 1:", file=out)
    _, steps, logits = _call(endpoint, info, QUESTION, "", 0, end=True)
    fresh = _prediction(logits, info, answer)
    _print_call(out, CALLS + 1, (0, steps), QUESTION, _shown(fresh, answer))
    print(
        f"\nwith the cell state carried across {CALLS} connections, {answer!r} has "
        f"p = {remembered.probability:.3f}; without it, p = {fresh.probability_of_answer:.3f}",
        file=out,
    )
    return remembered, fresh, session_id


def _ask_the_rnn(endpoint: _Endpoint, answer: str, out: TextIO) -> Answers:
    """The story's calls, then the short question, through a plain RNN; prints what it says."""
    with endpoint.client() as client:
        info = client.model_info()
    rnn = f"{endpoint.model} on the same server, a plain RNN ({_shape(info)}, trained at short gaps)"
    print(f"\nthe same {CALLS} calls to {rnn}:", file=out)
    session_id, offset = "", 0
    for text in (OPENING, *FILLER):
        session_id, offset, _ = _call(endpoint, info, text, session_id, offset)
    _, steps, logits = _call(endpoint, info, QUESTION, session_id, offset, end=True)
    long_gap = _prediction(logits, info, answer)
    _print_call(out, CALLS, (offset, steps), QUESTION, _shown(long_gap, answer))
    short_gap = _ask_at_a_short_gap(endpoint, info, answer)
    _print_call(out, CALLS + 1, (0, len(SHORT.split())), SHORT, _shown(short_gap, answer))
    return Answers(long_gap, short_gap)


def _ask_at_a_short_gap(endpoint: _Endpoint, info: ModelInfo, answer: str) -> Prediction:
    """The opening and the question in one call, on a fresh session."""
    _, _, logits = _call(endpoint, info, SHORT, "", 0, end=True)
    return _prediction(logits, info, answer)


def _print_side_by_side(lstm: Answers, rnn: Answers, fresh: Prediction, out: TextIO) -> None:
    question = f"p({lstm.long_gap.word}) after 'i speak fluent'"
    print(f"\n{question:<50}  LSTM    RNN", file=out)
    rows = (
        (f"'france' {LONG_GAP_WORDS} words back, over {CALLS} calls", lstm.long_gap, rnn.long_gap),
        (f"'france' {SHORT_GAP_WORDS} words back, in one call", lstm.short_gap, rnn.short_gap),
    )
    for label, left, right in rows:
        print(f"  {label:<48} {left.probability_of_answer:.3f}   {right.probability_of_answer:.3f}", file=out)
    print(f"  {'never told (a fresh session)':<48} {fresh.probability_of_answer:.3f}", file=out)


def _print_accuracy(accuracy: dict[str, GapAccuracy], sentences: int, out: TextIO) -> None:
    lstm, rnn = accuracy["lstm"], accuracy["rnn"]
    how = f"each a session streamed in chunks of 1-{MAX_CHUNK_WORDS} words over {CONNECTIONS} connections"
    print(f"\nlanguage-word accuracy over {sentences} held-out sentences per row,\n{how}:", file=out)
    print(f"{'(chance: 1 in 40)':<66} LSTM    RNN", file=out)
    rows = ((LONG_GAP_WORDS, lstm.long_gap, rnn.long_gap), (SHORT_GAP_WORDS, lstm.short_gap, rnn.short_gap))
    for words, left, right in rows:
        label = f"the country {words} words back"
        print(f"  {label:<64} {left:.3f}   {right:.3f}", file=out)


def _call(
    endpoint: _Endpoint, info: ModelInfo, text: str, session_id: str, offset: int, end: bool = False
) -> tuple[str, int, np.ndarray]:
    """One call on a new connection: start a session (no id) or go on with `session_id` at `offset`."""
    with endpoint.client() as client:
        session = (
            client.attach(session_id, offset, outputs=Outputs.LAST)
            if session_id
            else client.session(outputs=Outputs.LAST)
        )
        logits = session.send(encode_text(text, info.vocabulary), end=end)
        return session.session_id or "", session.offset, logits[-1]


def _shape(info: ModelInfo) -> str:
    return f"{info.cell.upper()} {info.layers} x {info.hidden}"


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


def _print_latency(latency: Latency, model: str, out: TextIO) -> None:
    print(
        f"\nlatency of {model} (server /metrics): {latency.chunks} chunks, "
        f"p50 ~ {latency.p50_s * 1e3:.2f} ms, p99 ~ {latency.p99_s * 1e3:.2f} ms, "
        f"mean inference {latency.mean_inference_s * 1e3:.3f} ms",
        file=out,
    )
