"""`conveyor vad FILE.wav`: stream a WAV file to a voice-activity model as a phone call would, in 20 ms frames
on one session, and print the speech segments the model's probabilities give (silero VAD's rules,
`serving.client.speech`).

The server cuts the windows; the client only sends frames as they come. At the end of the file the last
window is completed with zeros, as silero's `get_speech_timestamps` pads it. Against `--target`, or a server
of its own for `--model` (by default `artifacts/silero-vad-16k`, which `make demo-vad` cards from the
silero-vad wheel).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from prometheus_client import CollectorRegistry

from serving.client import ConveyorClient, ConveyorError, ModelInfo
from serving.client.speech import Audio, AudioError, read_wav, speech_segments
from serving.domain.errors import ModelLoadError
from serving.server.app import build_server
from serving.server.config import ServerConfig

SERVER_GRACE_S = 2.0


class VadError(RuntimeError):
    """The file, the model or the server cannot give segments: the message says why."""


@dataclass(frozen=True)
class VadOptions:
    """What `conveyor vad` was asked."""

    wav: Path
    target: str | None = None
    model: Path = Path("artifacts/silero-vad-16k")
    frame_ms: float = 20.0
    realtime: bool = False  # pace the frames at the audio's own speed, as a live call arrives


@dataclass(frozen=True)
class VadResult:
    """The file's per-window probabilities, its segments (start, end samples) and the frames' latency."""

    probabilities: np.ndarray
    segments: list[tuple[int, int]]
    rate: int
    frame_latency_ms: np.ndarray


def run_vad(options: VadOptions, out: TextIO | None = None) -> VadResult:
    """Stream `options.wav` through a server and print its speech segments to `out` (stdout by default)."""
    out = out or sys.stdout
    try:
        audio = read_wav(options.wav)
    except AudioError as exc:
        raise VadError(str(exc)) from None
    with _target(options) as target, ConveyorClient(target) as client:
        try:
            client.wait_for_ready(timeout_s=10)
            info = client.model_info()
            _check_model(info, audio)
            probabilities, latency = _stream(client, audio, options, info.window)
        except ConveyorError as exc:
            raise VadError(f"the call failed: {exc}") from None
    segments = speech_segments(probabilities, window=info.window, rate=audio.rate, samples=len(audio.samples))
    result = VadResult(probabilities, segments, audio.rate, latency)
    _print(result, info, audio, out)
    return result


def _check_model(info: ModelInfo, audio: Audio) -> None:
    if not info.window or info.input_size != 1:
        raise VadError(f"{info.name} takes no sample stream (it is not framed): serve a VAD model")
    rates = [int(values[0]) for name, values in info.constants if name == "sr"]
    if rates and rates[0] != audio.rate:
        raise VadError(
            f"the file is {audio.rate} Hz and {info.name} takes {rates[0]} Hz: resample it "
            f"(sox IN.wav -r {rates[0]} OUT.wav), or serve a card for {audio.rate} Hz"
        )


def _stream(
    client: ConveyorClient, audio: Audio, options: VadOptions, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each window's probability and each frame's round trip (ms), one session, frame after frame."""
    frame = max(1, round(audio.rate * options.frame_ms / 1000))
    samples = audio.samples
    padded = np.concatenate([samples, np.zeros(-len(samples) % window, np.float32)])
    outputs, latency = [], []
    started = time.perf_counter()
    with client.session() as session:
        for first in range(0, len(padded), frame):
            if options.realtime:
                time.sleep(max(0.0, started + first / audio.rate - time.perf_counter()))
            sent = time.perf_counter()
            outputs.append(session.send(padded[first : first + frame, None]))
            latency.append(1000 * (time.perf_counter() - sent))
    return np.concatenate(outputs)[:, 0], np.array(latency)


@contextmanager
def _target(options: VadOptions) -> Iterator[str]:
    if options.target:
        yield options.target
        return
    config = ServerConfig(model_dir=options.model, port=0, metrics_port=0)
    try:
        server = build_server(config, registry=CollectorRegistry())
    except (ModelLoadError, OSError) as exc:
        raise VadError(f"cannot start a server for {options.model}: {exc}") from None
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(SERVER_GRACE_S)


def _print(result: VadResult, info: ModelInfo, audio: Audio, out: TextIO) -> None:
    frames = len(result.frame_latency_ms)
    p50, p99 = np.percentile(result.frame_latency_ms, [50, 99])
    print(
        f"{audio.seconds:.1f} s at {audio.rate} Hz, {frames} frames on one session -> "
        f"{len(result.probabilities)} windows of {info.window} samples ({info.name})",
        file=out,
    )
    for number, (start, end) in enumerate(result.segments, 1):
        print(f"  speech {number}  {start / audio.rate:6.2f} s - {end / audio.rate:6.2f} s", file=out)
    print(f"frame round trip: p50 {p50:.2f} ms, p99 {p99:.2f} ms", file=out)
