"""What a bench run measures: its options, the cells of its grid, and the row each cell produces.

Modes:
    batched    the real server (cross-session batching up to `max_batch_size`), sessions in memory
    one_stream the same server, every session multiplexed on one Stream of one channel (1-step chunks): what a
               client that funnels many sessions through one connection gets
    frames     the same server through the Frames RPC: every session on one stream of one channel, packed
               into `frames_in_flight` frames (one chunk per session each; by default one frame, as a gateway
               sends its devices' chunks of one tick); each frame's next leaves when its result arrives
    durable    the same server with its sessions in the Redis store at `--store` (run only when given)
    unbatched  the real server with max batch size 1
    stateless  the real server used as a stateless one: each call a fresh session (start + end) carrying the
               whole history, as a stateless server's client must; one new step per call
    ort_floor  ONNX Runtime in process, every session's chunk in one batch: no server, no transport
    echo       a gRPC server answering with a response of the same size and no model: the transport floor
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from serving.server.config import ServerConfig

MODES = ("batched", "one_stream", "frames", "durable", "unbatched", "stateless", "ort_floor", "echo")
# The modes that can drive a server started elsewhere.
SERVER_MODES = ("batched", "one_stream", "frames", "stateless")


class BenchError(Exception):
    """The bench cannot run as asked (bad options, a child process that failed); the message says why."""


@dataclass(frozen=True)
class BenchOptions:
    """A bench run. Either `model_dir` (servers are started here) or `target` (a running server) is needed."""

    model_dir: Path | None = None  # artifact served by the bench's own server processes
    target: str | None = None  # HOST:PORT of a running server: only SERVER_MODES run, server CPU unknown
    modes: tuple[str, ...] = MODES
    sessions: tuple[int, ...] = (1, 16, 64, 256)
    chunk_steps: tuple[int, ...] = (1, 32)
    histories: tuple[int, ...] = (100, 1000)  # history lengths for stateless, and for batched at 1 session
    stateless_sessions: tuple[int, ...] = (1, 16)
    one_stream_sessions: tuple[int, ...] = (16, 64)  # one_stream's, 1-step chunks
    frame_sessions: tuple[int, ...] = (64, 256)  # frames', at every chunk length
    # Frames taking turns, the sessions split between them. Measured on the 2-core host, 1-step chunks: one
    # frame 10-20% more timesteps/s than two, at 20-25% less server CPU per step (two overlap one frame's
    # transport with the other's run, but pay the thread hand-offs and a frame's fixed cost twice); with
    # 32-step chunks at 256 sessions two gave ~15% more.
    frames_in_flight: int = 1
    channels: int = 16  # gRPC channels (connections) of the load process; a cell uses at most one per session
    warmup_s: float = 1.0  # per cell, before measuring
    seconds: float = 4.0  # measured per cell
    max_batch_size: int = 64  # the batched server's
    ort_threads: int = 1  # the server's ort_intra_op_threads, and ort_floor's
    ort_parallel_calls: int = ServerConfig.ort_parallel_calls  # the server's, and ort_floor's
    repeats: int = 1  # passes over the grid; each figure is the median of its passes
    store: str | None = None  # a Redis URL: adds the durable mode (its sessions in that store)

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.target is None):
            raise BenchError("give a model directory to serve, or --target HOST:PORT of a running server")
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise BenchError(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
        counts = (*self.sessions, *self.chunk_steps, *self.histories, *self.stateless_sessions)
        counts += (*self.one_stream_sessions, *self.frame_sessions, self.frames_in_flight)
        if (
            min(counts, default=1) < 1
            or min(self.channels, self.max_batch_size, self.repeats, self.ort_parallel_calls) < 1
        ):
            raise BenchError(
                "sessions, chunk steps, histories, frames in flight, channels, batch sizes, repeats, "
                "parallel calls: >= 1"
            )
        if self.seconds <= 0 or self.warmup_s < 0:
            raise BenchError("--seconds must be > 0 and the warm-up >= 0")


def require_model(model_dir: Path) -> None:
    """Raise `BenchError` unless `model_dir` holds an exported model (before any process is started)."""
    if not (model_dir / "model.onnx").is_file() or not (model_dir / "model.json").is_file():
        raise BenchError(
            f"no exported model in {model_dir}: run conveyor train and export, or pass --model DIR"
        )


def quick(options: BenchOptions) -> BenchOptions:
    """The `--quick` grid: the sessions the targets name, short cells; well under two minutes."""
    return replace(
        options,
        sessions=(1, 64),
        stateless_sessions=(1,),
        one_stream_sessions=(64,),
        warmup_s=0.5,
        seconds=1.5,
    )


@dataclass(frozen=True)
class Cell:
    """One measurement: a mode at a number of sessions and a chunk length, after `history_steps`."""

    mode: str
    sessions: int
    chunk_steps: int
    history_steps: int  # stateless: steps resent per call; stateful: steps a session holds before measuring
    channels: int


@dataclass(frozen=True)
class Part:
    """Sessions measured beside others in one load process: `cell`'s, each starting on model version
    `version` ("": the newest ready), and sending a chunk at most every `period_s` (0: as soon as its last
    is answered; Stream modes only). Each part's answers are counted apart."""

    cell: Cell
    version: str = ""
    period_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Part:
        """The part a job carries (as `dataclasses.asdict` wrote it)."""
        return cls(Cell(**data["cell"]), data["version"], data["period_s"])


@dataclass(frozen=True)
class Row:
    """One cell's figures: the JSON row and a line of the table."""

    mode: str
    sessions: int
    chunk_steps: int
    history_steps: int
    channels: int
    timesteps_per_s: float  # new timesteps answered per second (stateless: one per call)
    chunks_per_s: float  # messages answered per second
    p50_ms: float  # chunk latency, send to response (ort_floor: one runner call)
    p99_ms: float
    cpu_s_per_1k_steps: float | None  # server process CPU (ort_floor: the process running ORT)
    load_cpu_s_per_1k_steps: float | None  # the load process's CPU, for context: it shares the cores
    mean_batch: float | None  # rows per runner call (server modes, from its /metrics; ort_floor: its batch)
    chunks: int  # chunks answered in the measured window
    seconds: float  # the measured window

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return asdict(self)


def plan(options: BenchOptions) -> list[Cell]:
    """The cells of a run, the modes of one shape next to each other: on a shared machine whose load drifts,
    the figures a target compares are then taken seconds apart, not minutes."""
    modes = [m for m in options.modes if m in SERVER_MODES] if options.target else list(options.modes)
    if options.store is None and "durable" in modes:
        modes.remove("durable")
    cells: list[Cell] = []
    for mode in modes:
        channels = options.channels
        if mode == "stateless":
            grid = [(s, 1, h) for h in options.histories for s in options.stateless_sessions]
        elif mode == "one_stream":
            grid, channels = [(s, 1, 0) for s in options.one_stream_sessions], 1
        elif mode == "frames":
            grid, channels = [(s, t, 0) for t in options.chunk_steps for s in options.frame_sessions], 1
        else:
            sessions = set(options.sessions)
            if mode == "ort_floor" and "frames" in modes:  # the floor of each frame's batch too
                sessions |= set(options.frame_sessions)
            grid = [(s, t, 0) for t in options.chunk_steps for s in sorted(sessions)]
            if mode == "batched":  # the stateful side of the history comparison
                grid += [(1, 1, h) for h in options.histories]
        cells += [Cell(mode, s, t, h, min(channels, s)) for s, t, h in grid]
    return sorted(cells, key=lambda c: (c.chunk_steps, c.history_steps, c.sessions, MODES.index(c.mode)))
