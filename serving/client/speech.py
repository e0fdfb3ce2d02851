"""Audio on the client side of a voice-activity model: WAV files in, speech segments out.

`read_wav` takes 16-bit PCM mono WAV (what telephony and espeak-ng write) with the standard library alone.
`speech_segments` turns a stream's per-window speech probabilities into segments by silero VAD's own rules
(`silero_vad.utils_vad.get_speech_timestamps_from_probs`, without its cut of over-long speech): speech starts
at a window of probability >= threshold, ends once probability stays under threshold - 0.15 for the shortest
silence, is kept when longer than the shortest speech, and is padded on both sides.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PCM16_SCALE = 32768.0


class AudioError(ValueError):
    """A file that is not audio this client takes: the message says what it is and what to do."""


@dataclass(frozen=True)
class Audio:
    """Mono samples in [-1, 1) at `rate` samples per second."""

    samples: np.ndarray  # float32 [samples]
    rate: int

    @property
    def seconds(self) -> float:
        """The audio's length."""
        return len(self.samples) / self.rate


def read_wav(path: Path) -> Audio:
    """The samples of a 16-bit PCM mono WAV file; `AudioError` for anything else."""
    try:
        with wave.open(str(path), "rb") as file:
            channels, width, rate = file.getnchannels(), file.getsampwidth(), file.getframerate()
            frames = file.readframes(file.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioError(
            f"{path} is not a PCM WAV file ({exc}): convert it, e.g. sox IN -b 16 OUT.wav"
        ) from exc
    except OSError as exc:
        raise AudioError(f"cannot read {path}: {exc.strerror}") from exc
    if channels != 1 or width != 2:
        raise AudioError(
            f"{path} has {channels} channels of {8 * width}-bit samples; 16-bit mono is taken: "
            f"sox {path} -c 1 -b 16 OUT.wav"
        )
    return Audio(np.frombuffer(frames, "<i2").astype(np.float32) / _PCM16_SCALE, rate)


@dataclass(frozen=True)
class SegmentRules:
    """silero VAD's defaults for `get_speech_timestamps`."""

    threshold: float = 0.5
    min_speech_ms: int = 250
    min_silence_ms: int = 100
    speech_pad_ms: int = 30

    @property
    def exit_threshold(self) -> float:
        """Under it, speech may be ending."""
        return max(self.threshold - 0.15, 0.01)


def speech_segments(
    probabilities: np.ndarray, *, window: int, rate: int, samples: int, rules: SegmentRules | None = None
) -> list[tuple[int, int]]:
    """(start, end) sample of each speech segment, from the probability of each `window`-sample window of a
    stream of `samples` samples at `rate`."""
    rules = rules or SegmentRules()
    min_speech = rate * rules.min_speech_ms / 1000
    min_silence = rate * rules.min_silence_ms / 1000
    found: list[list[int]] = []
    start: int | None = None  # of the speech under way
    silent_since = 0  # where speech under way may have ended (0: it has not)
    for index, probability in enumerate(probabilities.tolist()):
        at = window * index
        if probability >= rules.threshold:
            silent_since = 0
            if start is None:
                start = at
                continue
        if start is None or probability >= rules.exit_threshold:
            continue
        silent_since = silent_since or at
        if at - silent_since < min_silence:
            continue
        if silent_since - start > min_speech:
            found.append([start, silent_since])
        start, silent_since = None, 0
    if start is not None and samples - start > min_speech:
        found.append([start, samples])
    return _padded(found, rate * rules.speech_pad_ms / 1000, samples)


def _padded(found: list[list[int]], pad: float, samples: int) -> list[tuple[int, int]]:
    """Each segment widened by `pad` samples, or by half the gap to its neighbour when that is shorter."""
    for index, segment in enumerate(found):
        if index == 0:
            segment[0] = int(max(0, segment[0] - pad))
        if index == len(found) - 1:
            segment[1] = int(min(samples, segment[1] + pad))
            continue
        following = found[index + 1]
        gap = following[0] - segment[1]
        if gap < 2 * pad:
            segment[1] += int(gap // 2)
            following[0] = int(max(0, following[0] - gap // 2))
        else:
            segment[1] = int(min(samples, segment[1] + pad))
            following[0] = int(max(0, following[0] - pad))
    return [(start, end) for start, end in found]
