"""silero VAD from its own wheel, served: `conveyor card` takes silero_vad.onnx (a constant `sr`, one window
per run, state [2, batch, 128]); a real server cuts the windows from audio sent in chunks of any size, and its
probabilities equal silero's own `OnnxWrapper` run window by window over the whole file, while 64 other calls
stream at the same time; frames of sessions at different window phases do too; the wheel's other graphs are
served or refused with the reason; bad audio gets its code and leaves the session as it was; a call outlives
the replica killed under it.

The reference is silero's own code, imported from the wheel (it needs torch, as the wheel does). The speech is
made at test time by espeak-ng and sox (`serving.cli.speak`)."""

from __future__ import annotations

import asyncio
import importlib.resources
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from local_services import ServerProcess, replicas_behind_nginx
from serving_harness import SILERO_FRAMING, assert_error, card_silero, chunk, connect, rejected, running

from modelcard.adopt import AdoptError, Described, Naming, adopt
from serving.cli.speak import SpeakError, speak
from serving.cli.vad import VadError, VadOptions, run_vad
from serving.client import AsyncConveyorClient, ClientOptions, ConveyorClient, RetryPolicy
from serving.client.speech import read_wav, speech_segments
from serving.domain.errors import ModelLoadError
from serving.server.app import RunningServer
from serving.wire import pb
from serving.wire.tensors import encode

torch = pytest.importorskip("torch")
utils_vad = pytest.importorskip("silero_vad.utils_vad")
pytestmark = pytest.mark.timeout(300)

DATA = importlib.resources.files("silero_vad") / "data"
SILERO = Path(str(DATA / "silero_vad.onnx"))
RATES = SILERO_FRAMING
CHUNK_SIZES = (160, 320, 511, 512, 4000, None)  # None: the whole file as one chunk
BACKGROUND_CALLS = 64
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """About 30 s of espeak-ng speech with silences, at 16 and 8 kHz."""
    directory = tmp_path_factory.mktemp("speech")
    try:
        return {rate: read_wav(speak(directory / f"{rate}.wav", rate)).samples for rate in RATES}
    except SpeakError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def vad_16k(vad_artifact: Path) -> Iterator[RunningServer]:
    with running(vad_artifact, max_batch_size=128) as server:
        yield server


def silero_streaming(samples: np.ndarray, rate: int, onnx: Path = SILERO) -> np.ndarray:
    """silero's own streaming: `OnnxWrapper` called on each whole window of the file in turn."""
    model = utils_vad.OnnxWrapper(str(onnx), force_onnx_cpu=True)
    window = RATES[rate].window
    audio = torch.from_numpy(samples)
    return np.array(
        [
            float(model(audio[first : first + window][None], rate))
            for first in range(0, len(samples) - window + 1, window)
        ]
    )


async def _stream_in(client: AsyncConveyorClient, samples: np.ndarray, size: int | None) -> np.ndarray:
    size = size or len(samples)
    async with client.session() as session:
        outputs = [
            await session.send(samples[first : first + size, None]) for first in range(0, len(samples), size)
        ]
    return np.concatenate(outputs)[:, 0]


async def _background(client: AsyncConveyorClient, stop: asyncio.Event, seed: int) -> int:
    """A call streaming noise in 20 ms frames, one every 20 ms as a phone call sends them, until `stop`; the
    windows it got. Packed into frames with the other calls' (a gateway's way): the checked sessions beside
    them then share the batches rather than wait behind 3200 messages a second."""
    rng = np.random.default_rng(seed)
    windows = 0
    async with client.session(via="frames") as session:
        while not stop.is_set():
            windows += len(await session.send(0.1 * rng.standard_normal((320, 1), dtype=np.float32)))
            await asyncio.sleep(0.02)
    return windows


async def _alongside_background(target: str, samples: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    async with AsyncConveyorClient(target) as client:
        stop = asyncio.Event()
        background = [
            asyncio.create_task(_background(client, stop, seed)) for seed in range(BACKGROUND_CALLS)
        ]
        await asyncio.sleep(0.2)  # the other calls are under way
        checked = await asyncio.gather(*(_stream_in(client, samples, size) for size in CHUNK_SIZES))
        stop.set()
        return list(checked), list(await asyncio.gather(*background))


def test_conveyor_card_takes_the_wheels_silero_vad(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "serving.cli.main", "card", str(SILERO), "--constant", "sr=16000",
        "--window", "512", "--context", "64", "--state", "state:stateN", "--out", str(tmp_path / "vad"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "sr = 16000, windows of 512 samples after 64; chunked vs whole 0.0e+00" in done.stdout
    card = json.loads((tmp_path / "vad" / "model.json").read_text())
    assert card["time_axis"] is False
    assert card["framing"] == {"window": 512, "context": 64}
    assert card["constants"] == [{"name": "sr", "dtype": "int64", "shape": [], "values": [16000]}]
    assert card["state"][0]["shape"] == [2, "batch", 128]


def test_any_chunk_size_gives_silero_streamings_probabilities_beside_64_calls(
    vad_16k: RunningServer, speech: dict[int, np.ndarray]
) -> None:
    samples = speech[16000]
    assert len(samples) >= 30 * 16000
    reference = silero_streaming(samples, 16000)
    checked, background = asyncio.run(_alongside_background(f"127.0.0.1:{vad_16k.port}", samples))
    for size, served in zip(CHUNK_SIZES, checked, strict=True):
        assert served.shape == reference.shape, size
        assert float(np.max(np.abs(served - reference))) <= TOLERANCE, size
    assert min(background) > 0  # the other calls streamed throughout
    assert reference.max() > 0.9 and reference.min() < 0.1  # speech and silence both


def _sent_in(server: RunningServer, samples: np.ndarray, size: int) -> np.ndarray:
    """The probabilities of `samples` sent on one session in chunks of `size`, one unary call each."""
    with ConveyorClient(f"127.0.0.1:{server.port}") as client, client.session() as session:
        sent = [session.send(samples[first : first + size, None]) for first in range(0, len(samples), size)]
    return np.concatenate(sent)[:, 0]


def test_one_sample_at_a_time(vad_16k: RunningServer, speech: dict[int, np.ndarray]) -> None:
    """The streaming extreme over the file's first second, where speech starts (a call per sample: the
    whole file would be 480k calls)."""
    samples = speech[16000][16000 : 2 * 16000]
    served = _sent_in(vad_16k, samples, 1)
    assert float(np.max(np.abs(served - silero_streaming(samples, 16000)))) <= TOLERANCE


def test_frames_of_calls_at_different_window_phases(
    vad_16k: RunningServer, speech: dict[int, np.ndarray]
) -> None:
    """24 calls, each first sending a chunk of its own length (so their windows fall at different phases),
    then 20 ms frames packed together: in one frame some complete a window and others none."""
    samples = speech[16000][: 6 * 16000]
    reference = silero_streaming(samples, 16000)

    async def call(client: AsyncConveyorClient, lead: int) -> np.ndarray:
        async with client.session(via="frames") as session:
            outputs = [await session.send(samples[:lead, None])]
            for first in range(lead, len(samples), 320):
                outputs.append(await session.send(samples[first : first + 320, None]))
        return np.concatenate(outputs)[:, 0]

    async def calls() -> list[np.ndarray]:
        async with AsyncConveyorClient(f"127.0.0.1:{vad_16k.port}") as client:
            return list(await asyncio.gather(*(call(client, 21 * (i + 1)) for i in range(24))))

    for served in asyncio.run(calls()):
        assert float(np.max(np.abs(served - reference))) <= TOLERANCE


def test_8_khz(tmp_path: Path, speech: dict[int, np.ndarray]) -> None:
    samples = speech[8000]
    with running(card_silero(tmp_path / "vad-8k", 8000)) as server:
        served = _sent_in(server, samples, 160)
    assert float(np.max(np.abs(served - silero_streaming(samples, 8000)))) <= TOLERANCE


def test_segments_equal_silero_get_speech_timestamps(
    vad_16k: RunningServer, speech: dict[int, np.ndarray]
) -> None:
    samples = speech[16000]
    model = utils_vad.OnnxWrapper(str(SILERO), force_onnx_cpu=True)
    expected = utils_vad.get_speech_timestamps(torch.from_numpy(samples), model, sampling_rate=16000)
    padded = np.concatenate([samples, np.zeros(-len(samples) % 512, np.float32)])  # as silero pads the tail
    (probabilities,) = asyncio.run(_served_in_frames(f"127.0.0.1:{vad_16k.port}", padded))
    segments = speech_segments(probabilities, window=512, rate=16000, samples=len(samples))
    assert len(segments) == len(expected) == 5
    for (start, end), theirs in zip(segments, expected, strict=True):
        assert abs(start - theirs["start"]) <= 512 and abs(end - theirs["end"]) <= 512


async def _served_in_frames(target: str, samples: np.ndarray) -> list[np.ndarray]:
    async with AsyncConveyorClient(target) as client:
        return [await _stream_in(client, samples, 320)]


@pytest.mark.parametrize(
    ("name", "constant"),
    [
        ("silero_vad_16k_op15.onnx", True),
        ("silero_vad_op18_ifless.onnx", True),
        ("silero_vad_half.onnx", False),
    ],
)
def test_the_wheels_other_graphs_are_served(
    tmp_path: Path, speech: dict[int, np.ndarray], name: str, constant: bool
) -> None:
    onnx = Path(str(DATA / name))
    samples = speech[16000][: 5 * 16000]
    with running(card_silero(tmp_path / "vad", name=name, constant=constant)) as server:
        served = _sent_in(server, samples, 320)
    reference = _windows_by_hand(onnx, samples, constant)
    assert float(np.max(np.abs(served - reference))) <= TOLERANCE


def _windows_by_hand(onnx: Path, samples: np.ndarray, constant: bool) -> np.ndarray:
    """What OnnxWrapper does, window by window, for graphs it does not take (no `sr` input)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    state, context, found = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32), []
    for first in range(0, len(samples) - 511, 512):
        x = np.concatenate([context, samples[None, first : first + 512]], axis=1)
        feeds = {"input": x, "state": state} | ({"sr": np.array(16000, np.int64)} if constant else {})
        output, state = session.run(["output", "stateN"], feeds)
        context = x[:, -64:]
        found.append(float(output[0, 0]))
    return np.array(found)


@pytest.mark.parametrize("name", ["silero_vad_16k_sequence.onnx", "silero_vad_openvino_16k.onnx"])
def test_the_wheels_graphs_without_a_batch_axis_are_refused_with_why(tmp_path: Path, name: str) -> None:
    names = {"silero_vad_16k_sequence.onnx": (("h", "hn"), ("c", "cn"))}.get(name, (("state", "stateN"),))
    naming = Naming(states=names, framing=RATES[16000])
    with pytest.raises(
        AdoptError, match=r"no batch axis: the graph runs one stream at a time.*dynamic batch axis"
    ):
        adopt(Path(str(DATA / name)), tmp_path / "vad", naming, Described("vad"))


@pytest.mark.parametrize(
    ("naming", "message"),
    [
        (Naming(states=(("state", "stateN"),), constants=(("sr", "16000"),)), r"--window SAMPLES --context"),
        (
            Naming(states=(("state", "stateN"),), framing=RATES[16000]),
            r"2 inputs besides the state.*--constant",
        ),
        (
            Naming(states=(("state", "stateN"),), constants=(("sr", "fast"),), framing=RATES[16000]),
            r"not int64",
        ),
        (
            Naming(states=(("state", "stateN"),), constants=(("sr", "1,2"),), framing=RATES[16000]),
            r"2 values for shape",
        ),
        (
            Naming(states=(("state", "stateN"),), constants=(("rate", "1"),), framing=RATES[16000]),
            r"no input 'rate'",
        ),
    ],
    ids=[
        "no framing",
        "no constant",
        "constant not a number",
        "constant of two values",
        "no such input",
    ],
)
def test_card_refuses_what_does_not_fit_the_graph(tmp_path: Path, naming: Naming, message: str) -> None:
    with pytest.raises(AdoptError, match=message):
        adopt(SILERO, tmp_path / "vad", naming, Described("vad"))


def test_a_card_whose_constant_is_not_the_graphs_is_refused_at_start(tmp_path: Path) -> None:
    artifact = card_silero(tmp_path / "vad")
    card = json.loads((artifact / "model.json").read_text())
    card["constants"][0] |= {"dtype": "float32", "values": [16000.0]}
    (artifact / "model.json").write_text(json.dumps(card))
    with (
        pytest.raises(ModelLoadError, match=r"input 'sr' is tensor\(int64\).*card describes tensor\(float\)"),
        running(artifact),
    ):
        pass


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (encode(np.zeros((320, 1), np.int64)), r"FLOAT32 samples of shape \[samples, 1\], got int64"),
        (
            encode(np.zeros((320, 2), np.float32)),
            r"FLOAT32 samples of shape \[samples, 1\], got float32 \[320, 2\]",
        ),
        (encode(np.full((320, 1), np.nan, np.float32)), r"NaN or infinite values \(first at timestep 0\)"),
        (encode(np.full((320, 1), np.inf, np.float32)), r"NaN or infinite"),
    ],
    ids=["int64 samples", "two channels", "NaN", "infinity"],
)
def test_bad_audio_gets_invalid_argument_and_leaves_the_call_as_it_was(
    vad_16k: RunningServer, inputs: pb.Tensor, message: str
) -> None:
    samples = 0.1 * np.random.default_rng(1).standard_normal((700, 1), dtype=np.float32)
    with connect(vad_16k) as stub:
        session_id = uuid.uuid4().hex
        stub.Step(chunk(session_id, samples, 0, start=True))
        before = stub.Snapshot(pb.SnapshotRequest(session_id=session_id))
        request = pb.ChunkRequest(session_id=session_id, inputs=inputs, offset=700)
        assert_error(rejected(stub.Step, request), grpc.StatusCode.INVALID_ARGUMENT, message)
        assert stub.Snapshot(pb.SnapshotRequest(session_id=session_id)) == before
        # The call goes on where it was: its carried samples and state are intact.
        after = stub.Step(chunk(session_id, samples, 700))
        assert after.steps == 1400 and list(after.outputs.shape) == [1, 1]  # 700 + 700 samples: window 2 of 2


def test_conveyor_vad_prints_silero_s_segments(vad_16k: RunningServer, tmp_path: Path) -> None:
    wav = speak(tmp_path / "call.wav", 16000)
    model = utils_vad.OnnxWrapper(str(SILERO), force_onnx_cpu=True)
    samples = torch.from_numpy(read_wav(wav).samples)
    expected = utils_vad.get_speech_timestamps(samples, model, sampling_rate=16000)
    printed = io.StringIO()
    result = run_vad(VadOptions(wav, target=f"127.0.0.1:{vad_16k.port}"), printed)
    assert result.segments == [(theirs["start"], theirs["end"]) for theirs in expected]
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("30.2 s at 16000 Hz, 1512 frames on one session -> 945 windows of 512 samples")
    first = expected[0]
    assert f"speech 1  {first['start'] / 16000:6.2f} s - {first['end'] / 16000:6.2f} s" in lines[1]


def test_conveyor_vad_refuses_audio_it_does_not_take(vad_16k: RunningServer, tmp_path: Path) -> None:
    target = f"127.0.0.1:{vad_16k.port}"
    stereo, eight_khz, text = tmp_path / "stereo.wav", tmp_path / "8k.wav", tmp_path / "notes.wav"
    subprocess.run(
        ["sox", "-n", "-r", "16000", "-c", "2", "-b", "16", str(stereo), "trim", "0", "0.1"], check=True
    )
    subprocess.run(
        ["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(eight_khz), "trim", "0", "0.1"], check=True
    )
    text.write_text("not audio")
    cases = {
        stereo: r"2 channels of 16-bit samples; 16-bit mono is taken: sox .* -c 1 -b 16",
        eight_khz: r"the file is 8000 Hz and .* takes 16000 Hz: resample it",
        text: r"is not a PCM WAV file",
        tmp_path / "missing.wav": r"cannot read",
    }
    for wav, message in cases.items():
        with pytest.raises(VadError, match=message):
            run_vad(VadOptions(wav, target=target), io.StringIO())


def test_a_call_outlives_the_replica_killed_mid_file(
    vad_artifact: Path, tmp_path: Path, speech: dict[int, np.ndarray]
) -> None:
    """Two replicas on one Redis behind nginx; kill -9 of the one holding the call, 10 s into the file: the
    call goes on at the other, its carried samples and state read back from Redis, with the same
    probabilities."""
    samples = speech[16000]
    patient = ClientOptions(
        route_key="call-1", retry=RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.25)
    )
    with replicas_behind_nginx(vad_artifact, tmp_path) as (one, two, proxy_port):

        async def call() -> np.ndarray:
            outputs = []
            client = AsyncConveyorClient(f"127.0.0.1:{proxy_port}", patient)
            async with client, client.session() as session:
                for first in range(0, len(samples), 320):
                    if first == 10 * 16000:
                        owner = max((one, two), key=ServerProcess.chunks_answered)
                        # affinity: one replica had it all
                        assert one.chunks_answered() * two.chunks_answered() == 0
                        owner.kill()
                    outputs.append(await session.send(samples[first : first + 320, None]))
            return np.concatenate(outputs)[:, 0]

        served = asyncio.run(call())
        survivor = two if one.process is None else one
        assert one.process is None or two.process is None
        assert survivor.chunks_answered() > 0
    assert float(np.max(np.abs(served - silero_streaming(samples, 16000)))) <= TOLERANCE
