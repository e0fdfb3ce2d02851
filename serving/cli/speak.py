"""Speech to test a voice-activity model on: espeak-ng speaks sentences, silences go between them, sox
resamples the whole to the model's rate (16-bit mono WAV). Both are Debian packages (`make services`).

    python -m serving.cli.speak OUT.wav [--rate 16000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.client.speech import read_wav

# About 30 s: five sentences, each after a silence of its own length, so segments start at uneven times.
SENTENCES = (
    ("I grew up in France, in a small town near the sea.", 1.8),
    ("Every summer we visited my grandmother and her old dog.", 3.0),
    ("Later we moved to the city, and my father found a new job there.", 2.4),
    ("One year my sister taught music to the children of the city school.", 3.6),
    ("I speak fluent French.", 2.8),
)
TAIL_S = 1.5


class SpeakError(RuntimeError):
    """espeak-ng or sox is missing or failed."""


def speak(out: Path, rate: int = 16000, sentences: Sequence[tuple[str, float]] = SENTENCES) -> Path:
    """Write the sentences, each after its silence (seconds), then `TAIL_S` of silence, to `out` at `rate`."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SpeakError(f"{tool} is not installed: apt-get install -y espeak-ng sox")
    with tempfile.TemporaryDirectory() as scratch:
        parts: list[np.ndarray] = []
        spoken_rate = 0
        for index, (text, silence_s) in enumerate(sentences):
            spoken = Path(scratch) / f"{index}.wav"
            _run(["espeak-ng", "-v", "en", "-w", str(spoken), text])
            audio = read_wav(spoken)
            spoken_rate = audio.rate
            parts += [np.zeros(round(silence_s * audio.rate), np.float32), audio.samples]
        parts.append(np.zeros(round(TAIL_S * spoken_rate), np.float32))
        joined = Path(scratch) / "joined.wav"
        _write(joined, np.concatenate(parts), spoken_rate)
        out.parent.mkdir(parents=True, exist_ok=True)
        # -D: no dither, whose noise is random: the same sentences always make the same file.
        _run(["sox", "-D", str(joined), "-r", str(rate), "-b", "16", "-c", "1", str(out)])
    return out


def _write(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.clip(samples, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes())


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SpeakError(f"{' '.join(command[:1])} failed: {done.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write ~30 s of espeak-ng speech with silences as a WAV.")
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--rate", type=int, default=16000, help="samples per second (silero VAD: 16000 or 8000)"
    )
    args = parser.parse_args(argv)
    try:
        path = speak(args.out, args.rate)
    except SpeakError as exc:
        raise SystemExit(f"speak: {exc}") from None
    print(f"wrote {path}: {read_wav(path).seconds:.1f} s at {args.rate} Hz")


if __name__ == "__main__":
    main()
