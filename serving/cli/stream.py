"""`conveyor stream`: send a sequence to a Conveyor server in chunks, over one session.

Token models read text (words are looked up in the vocabulary that GetModelInfo returns); feature models read
CSV (one row per timestep, one column per feature, an optional header) or .npy. After each chunk it prints the
top predictions at the chunk's last step, or, with `output`, saves every timestep's outputs to a .npy file.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from serving.client import ClientOptions, ConveyorClient, ConveyorError, ModelInfo, Outputs, Session, Tls

STDIN = "-"
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*|\S")  # words, and each punctuation mark on its own (". " too)
_SHOWN_TEXT_CHARS = 36


class StreamError(Exception):
    """The stream cannot go on, for a reason the user can act on; the message says which and why."""


@dataclass(frozen=True)
class StreamOptions:
    """What to stream where. Defaults match `conveyor stream`'s flags."""

    target: str = "127.0.0.1:50051"  # HOST:PORT of the server
    input: str = STDIN  # a text, .csv or .npy path; "-" reads stdin (text for token models, CSV otherwise)
    chunk_steps: int = 8  # timesteps per chunk (the last chunk may be shorter)
    session_id: str | None = None  # None: the server issues one
    offset: int | None = None  # go on with a live session (e.g. one left open with keep) at this offset
    top_k: int = 3  # predictions printed per chunk, token models
    output: Path | None = None  # save every timestep's outputs here (.npy) instead of printing per chunk
    keep: bool = False  # leave the session open at the end, to go on later with session_id and offset
    connect_timeout_s: float = 5.0
    tls: Tls | None = None  # TLS to the server (a CA to trust, a client certificate for mutual TLS)
    token: str | None = None  # bearer token, for a server with tenants
    model: str = ""  # the model, on a server of several; "": its only one
    model_version: str = ""  # the version (number or label) to begin on; "": the newest ready
    progress: bool = True  # tqdm bar on stderr


@dataclass(frozen=True)
class StreamResult:
    """Where the stream left its session."""

    session_id: str
    steps: int  # the session's step count at the end (the next offset, when kept)
    ended: bool


def stream(options: StreamOptions, out: TextIO | None = None) -> StreamResult:
    """Stream `options.input` to the server; results go to `out` (stdout). Raises StreamError on failure."""
    if options.chunk_steps < 1:
        raise StreamError(f"chunk steps must be >= 1, got {options.chunk_steps}")
    data = _read_bytes(options.input)  # before connecting: a wrong path fails at once
    try:
        addressed = ClientOptions(
            tls=options.tls, token=options.token, model=options.model, model_version=options.model_version
        )
        client = ConveyorClient(options.target, addressed)
    except ConveyorError as exc:  # e.g. a certificate file that cannot be read
        raise StreamError(f"cannot connect to {options.target}: {exc.message}") from None
    with client:
        info = _connect(client, options)
        if options.chunk_steps > info.max_chunk_steps:
            raise StreamError(f"chunk steps {options.chunk_steps} exceed the server's {info.max_chunk_steps}")
        inputs = parse_inputs(data, options.input, info)
        result = _send_all(client, info, inputs, options, out or sys.stdout)
    if options.keep:
        print(
            f"session {result.session_id} left open at offset {result.steps}: go on with "
            f"--session {result.session_id} --offset {result.steps}",
            file=sys.stderr,
        )
    return result


def parse_inputs(data: bytes, source: str, info: ModelInfo) -> np.ndarray:
    """`data`, read from `source`, as the model's input: (time,) int64 ids or (time, features) float32.

    The format follows the path's suffix (.npy, .csv, else text); stdin is text for token models, else CSV.
    """
    suffix = "" if source == STDIN else Path(source).suffix.lower()
    if suffix == ".npy":
        array = _checked(_parse_npy(data, source), info)
    elif info.takes_tokens and suffix == ".csv":
        raise StreamError(f"model {info.name!r} takes text (or .npy of token ids), not CSV")
    elif info.takes_tokens:
        array = encode_text(data.decode(errors="replace"), info.vocabulary)
    else:
        array = _checked(_parse_csv(data.decode(errors="replace"), source), info)
    if len(array) == 0:
        raise StreamError(f"{_name(source)} holds no timesteps")
    return array


def encode_text(text: str, vocabulary: Sequence[str]) -> np.ndarray:
    """Token ids of `text` (case-insensitive, punctuation marks are words); an unknown word: StreamError."""
    index = {word: i for i, word in enumerate(vocabulary)}
    ids = []
    for word in _WORD.findall(text.lower()):
        if word not in index:
            examples = ", ".join(vocabulary[:8])
            raise StreamError(
                f"unknown word {word!r}: the model knows {len(vocabulary)} words, for example {examples}"
            )
        ids.append(index[word])
    return np.array(ids, dtype=np.int64)


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels of one timestep's logits, with their softmax probabilities."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    probabilities = shifted / shifted.sum()
    best = np.argsort(probabilities)[::-1][:k]
    return [(labels[i] if i < len(labels) else str(i), float(probabilities[i])) for i in best]


def _connect(client: ConveyorClient, options: StreamOptions) -> ModelInfo:
    try:
        client.wait_for_ready(options.connect_timeout_s)
        return client.model_info()
    except ConveyorError as exc:
        raise StreamError(f"cannot reach a Conveyor server at {options.target}: {exc.message}") from None


def _send_all(
    client: ConveyorClient, info: ModelInfo, inputs: np.ndarray, options: StreamOptions, out: TextIO
) -> StreamResult:
    session = _open_session(client, options)
    collected: list[np.ndarray] = []
    bar = tqdm(total=len(inputs), unit="step", file=sys.stderr, disable=not options.progress, leave=False)
    try:
        for start in range(0, len(inputs), options.chunk_steps):
            chunk = inputs[start : start + options.chunk_steps]
            last = start + len(chunk) == len(inputs)
            outputs = _send(session, chunk, start, end=last and not options.keep)
            if options.output is not None:
                collected.append(outputs)
            else:
                tqdm.write(_describe(info, chunk, start, outputs[-1], options.top_k), file=out)
            bar.update(len(chunk))
    finally:
        bar.close()
        if not options.keep:
            session.end()  # a failed stream frees its session too (no-op once the last chunk ended it)
    if options.output is not None:
        _save(options.output, np.concatenate(collected), out)
    return StreamResult(session.session_id or "", session.offset, session.cursor.ended)


def _open_session(client: ConveyorClient, options: StreamOptions) -> Session:
    outputs = Outputs.LAST if options.output is None else Outputs.ALL
    if options.offset is None:
        return client.session(options.session_id, outputs=outputs)
    if options.session_id is None:
        raise StreamError("an offset continues a live session: give its session id too")
    return client.attach(options.session_id, options.offset, outputs=outputs)


def _send(session: Session, chunk: np.ndarray, start: int, end: bool) -> np.ndarray:
    try:
        return session.send(chunk, end=end)
    except ConveyorError as exc:
        where = f"steps {start}-{start + len(chunk) - 1}"
        raise StreamError(f"the server refused {where}: {exc.code.name}: {exc.message}") from None


def _describe(info: ModelInfo, chunk: np.ndarray, start: int, logits: np.ndarray, k: int) -> str:
    steps = f"steps {f'{start}-{start + len(chunk) - 1}':>11}"
    if not info.takes_tokens:
        ((label, probability),) = top_k(logits, info.output_labels, 1)
        return f"{steps} -> {label} ({probability:.3f})"
    text = " ".join(info.vocabulary[i] for i in chunk)
    if len(text) > _SHOWN_TEXT_CHARS:
        text = "..." + text[-(_SHOWN_TEXT_CHARS - 3) :]
    predictions = "  ".join(f"{word} {p:.3f}" for word, p in top_k(logits, info.output_labels, k))
    return f"{steps}  {text:<{_SHOWN_TEXT_CHARS}}  -> {predictions}"


def _checked(array: np.ndarray, info: ModelInfo) -> np.ndarray:
    if info.takes_tokens:
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise StreamError(f"token ids must be a 1-D integer array, got {array.dtype} {array.shape}")
        if len(array) and not 0 <= array.min() <= array.max() < info.input_size:
            raise StreamError(f"token ids must be in 0..{info.input_size - 1}")
        return array.astype(np.int64, copy=False)
    if array.ndim != 2 or array.shape[1] != info.input_size:
        shape = "x".join(map(str, array.shape))
        raise StreamError(f"model {info.name!r} takes {info.input_size} features per timestep, got {shape}")
    if not np.isfinite(array).all():
        raise StreamError("the input holds NaN or infinite values")
    return array.astype(np.float32, copy=False)


def _parse_csv(text: str, source: str) -> np.ndarray:
    # A header row is allowed: when the first row is not numbers, skip it.
    for skip in (0, 1):
        try:
            return np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2, skiprows=skip)
        except ValueError as exc:
            failure = exc
    raise StreamError(f"{_name(source)} is not CSV of numbers: {failure}")


def _parse_npy(data: bytes, source: str) -> np.ndarray:
    try:
        array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise StreamError(f"{_name(source)} is not a .npy array: {exc}") from None
    return array


def _read_bytes(source: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if source == STDIN else Path(source).read_bytes()
    except OSError as exc:
        raise StreamError(f"cannot read {_name(source)}: {exc.strerror or exc}") from None


def _save(path: Path, outputs: np.ndarray, out: TextIO) -> None:
    try:
        np.save(path, outputs)
    except OSError as exc:
        raise StreamError(f"cannot write {path}: {exc}") from None
    print(f"wrote {path}: outputs of shape {outputs.shape} float32", file=out)


def _name(source: str) -> str:
    return "stdin" if source == STDIN else source
