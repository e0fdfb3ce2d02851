"""One function per `conveyor` subcommand: flags in, one stage call, its errors turned into `CommandError`.

Stages are imported inside the functions: `training` and `export` need torch, which the serving image lacks.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CommandError(Exception):
    """A subcommand failed for a reason the user can act on; the message is printed as is."""


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn a stage's own, readable exceptions into `CommandError`; anything else is a bug: traceback."""
    try:
        yield
    except kinds as exc:
        raise CommandError(str(exc)) from exc


def train(args: argparse.Namespace) -> None:
    from training.checkpoint import CheckpointError
    from training.loop import FitOptions
    from training.tasks import UnknownTaskError
    from training.train import TrainOptionError, TrainOptions
    from training.train import train as run_training

    given = {  # the flags given; the rest keep FitOptions' defaults
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "grad_clip_norm": args.grad_clip,
        "patience_evals": args.patience,
    }
    fit = FitOptions(**{name: value for name, value in given.items() if value is not None})
    options = TrainOptions(
        seed=args.seed,
        cell=args.cell,
        hidden_size=args.hidden_size,
        max_gap_words=args.max_gap_words,
        fit=fit,
    )
    if args.data is not None:
        result = _train_on_data(args, options)
    else:
        with _user_errors(UnknownTaskError, TrainOptionError, CheckpointError, OSError):
            result = run_training(args.task, args.out, options)
    print(
        f"trained {args.task or args.data} in {result.wall_time_s:.1f} s ({result.steps} steps): "
        f"{result.headline_metric} = {result.headline_value:.4f}; artifact {result.out_dir}"
    )


def _train_on_data(args: argparse.Namespace, options: Any) -> Any:
    """`conveyor train --data FILE`: the file read by `training.data`, trained as `training.tasks.data`."""
    from training.data import Columns, DataFileError, read_sequences
    from training.loop import data_rng
    from training.tasks.data import DataTask, DataTaskConfig, DataTaskError
    from training.train import DATA_SPLIT, TrainOptionError, train_task

    if args.max_gap_words is not None:
        raise CommandError("--max-gap-words applies to the language task only")
    features = tuple(name.strip() for name in args.features.split(",")) if args.features else None
    columns = Columns(args.sequence_column, args.order_column or None, args.target_column, features)
    config = DataTaskConfig(
        source=str(args.data),
        objective=args.objective,
        answer=args.answer,
        validation_fraction=args.validation_fraction,
        test_source=None if args.test is None else str(args.test),
    )
    with _user_errors(DataFileError, DataTaskError, TrainOptionError, OSError):
        data = read_sequences(args.data, columns, args.objective)
        test = None if args.test is None else read_sequences(args.test, columns, args.objective)
        task = DataTask(data, config, data_rng(args.seed, DATA_SPLIT), test)
        return train_task(task, args.out, options)


def export(args: argparse.Namespace) -> None:
    from export import ExportError, export_artifact

    with _user_errors(ExportError):
        card = export_artifact(args.artifact)
    summary = card.to_dict()
    parity = summary["parity"]
    print(
        f"exported {args.artifact}/model.onnx (sha256 {summary['onnx_sha256'][:12]}): "
        f"ONNX Runtime vs PyTorch {parity['ort_vs_torch_max_scaled']:.1e} scaled "
        f"({parity['ort_vs_torch_max_abs']:.1e} abs), "
        f"chunked vs whole {parity['chunked_vs_whole_max_abs']:.1e}"
    )


def card(args: argparse.Namespace) -> None:
    from modelcard.adopt import AdoptError, Described, Naming, adopt
    from modelcard.framing import Framing

    out_dir = args.out or args.onnx.with_suffix("")
    if args.window is None and args.context:
        raise CommandError("--context goes with --window")
    try:
        framing = Framing(args.window, args.context) if args.window else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    naming = Naming(args.input, args.output, tuple(args.state), tuple(args.constant), framing)
    labels = tuple(args.labels.split(",")) if args.labels else ()
    described = Described(
        args.name or out_dir.resolve().name, args.task, args.vocabulary_size, args.meaning, labels
    )
    with _user_errors(AdoptError):
        written = adopt(args.onnx, out_dir, naming, described)
    states = ", ".join(f"{s.name} {s.input}->{s.output} {s.card_shape}" for s in written.state)
    chunked = written.parity.chunked_vs_whole_max_abs if written.parity else float("nan")
    extras = "".join(f", {c.name} = {','.join(map(str, c.values))}" for c in written.constants)
    if written.framing is not None:
        extras += f", windows of {written.framing.window} samples after {written.framing.context}"
    print(
        f"wrote {out_dir}/model.json for {args.onnx}: {written.input.name} {written.input.kind} "
        f"[{written.input.size}] -> {written.output.name} [{written.output.size}], state {states}{extras}; "
        f"chunked vs whole {chunked:.1e}. Serve it: conveyor serve --model {out_dir}"
    )


def experiment(args: argparse.Namespace) -> None:
    from training.experiment import run_gap_sweep
    from training.sweep_options import SweepOptions

    with _user_errors(OSError):
        run_gap_sweep(args.out, SweepOptions.quick() if args.quick else SweepOptions())


def serve(args: argparse.Namespace) -> None:
    from serving.domain.errors import ModelLoadError, StoreUnavailableError
    from serving.server.app import serve as run_server
    from serving.server.config import ConfigError, ServerConfig

    flags: dict[str, Any] = {
        "model_dir": args.model,
        "models_dir": args.models,
        "drain_deadline_s": args.drain_deadline,
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "max_batch_size": args.max_batch_size,
        "max_delay_ms": args.max_delay_ms,
        "max_sessions": args.max_sessions,
        "idle_ttl_s": args.idle_ttl_s,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "tokens_file": args.tokens_file,
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _user_errors(ConfigError, ModelLoadError, StoreUnavailableError, OSError):
        config = ServerConfig.from_env(os.environ, **{k: v for k, v in flags.items() if v is not None})
        run_server(config)


def stream(args: argparse.Namespace) -> None:
    from serving.cli.stream import StreamError, StreamOptions
    from serving.cli.stream import stream as run_stream
    from serving.client import Tls

    options = StreamOptions(
        target=args.target,
        input=args.input,
        chunk_steps=args.chunk_steps,
        session_id=args.session,
        offset=args.offset,
        top_k=args.top,
        output=args.output,
        keep=args.keep,
        tls=Tls(args.ca, args.cert, args.key) if args.tls or args.ca or args.cert or args.key else None,
        token=args.token or os.environ.get("CONVEYOR_TOKEN"),
        model=args.model or "",
        model_version=args.model_version or "",
    )
    with _user_errors(StreamError):
        run_stream(options)


def models(args: argparse.Namespace) -> None:
    from serving.cli.models import list_models
    from serving.client import ConveyorError

    with _user_errors(ConveyorError):
        list_models(args.target, args.token or os.environ.get("CONVEYOR_TOKEN"))


def token(args: argparse.Namespace) -> None:
    from serving.server.auth import new_token
    from serving.server.config import ConfigError

    with _user_errors(ConfigError):
        secret, line = new_token(args.tenant, args.max_sessions)
    print(f"token (give it to {args.tenant}; it is not stored anywhere): {secret}")
    print(f"line for the tokens file (CONVEYOR_TOKENS_FILE): {line}")


def demo(args: argparse.Namespace) -> None:
    from serving.cli.demo import DemoError, DemoOptions, run_demo

    with _user_errors(DemoError):
        run_demo(DemoOptions(artifacts=args.artifacts))


def vad(args: argparse.Namespace) -> None:
    from serving.cli.vad import VadError, VadOptions, run_vad

    with _user_errors(VadError):
        run_vad(VadOptions(args.wav, args.target, args.model, args.frame_ms, args.realtime))


def bench(args: argparse.Namespace) -> None:
    from serving.bench.cli import run
    from serving.bench.grid import BenchError

    with _user_errors(BenchError, OSError):
        run(args)


def soak(args: argparse.Namespace) -> None:
    from serving.bench.grid import BenchError
    from serving.bench.soak.cli import run

    with _user_errors(BenchError, OSError):
        run(args)
