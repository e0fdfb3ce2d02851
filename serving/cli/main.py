"""`conveyor`: the command line. Thin: it parses flags and calls one function per subcommand.

Each subcommand imports its stage only when it runs, so `conveyor serve` and `conveyor stream` work in
the serving image, which has no torch. A stage's own errors carry readable messages; they are printed as
one line and the command exits non-zero, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from serving.cli import commands

Handler = Callable[[argparse.Namespace], None]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        handler(args)
    except commands.CommandError as exc:
        print(f"conveyor {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"conveyor {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Conveyor: train a recurrent model, export it to ONNX with explicit state, serve it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_export(sub)
    _add_card(sub)
    _add_experiment(sub)
    _add_serve(sub)
    _add_models(sub)
    _add_stream(sub)
    _add_demo(sub)
    _add_vad(sub)
    _add_bench(sub)
    _add_soak(sub)
    _add_token(sub)
    return parser


def _command(sub: Subparsers, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _add_train(sub: Subparsers) -> None:
    p = _command(
        sub,
        "train",
        "Train a model on a generated task or on your own sequences, and write its artifact directory.",
        commands.train,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a generated task: language or sensor")
    source.add_argument(
        "--data", type=Path, help="your own sequences: a .csv or .parquet (long format), .npz or .ts file"
    )
    p.add_argument("--out", type=Path, required=True, help="artifact directory, e.g. artifacts/language")
    p.add_argument("--seed", type=int, default=0)
    # Sizes and budgets other than the task's own: e.g. a wider model to benchmark the server with.
    p.add_argument("--hidden-size", type=_positive, help="hidden units (default: the task's, 64)")
    p.add_argument("--max-steps", type=_positive, help="optimisation steps (default 3000)")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], help="recurrent cell (default: lstm)")
    p.add_argument("--learning-rate", type=_positive_float, help="Adam's first learning rate (default 0.01)")
    p.add_argument("--grad-clip", type=_positive_float, help="gradient-norm clipping (default 1.0)")
    p.add_argument(
        "--patience",
        type=_positive,
        help="validations (one per 100 steps) with no better loss before it stops (4)",
    )
    p.add_argument(
        "--max-gap-words", type=_positive, help="language task: longest training gap (default 200 words)"
    )
    data = p.add_argument_group("--data", "how a data file is read and trained")
    data.add_argument("--test", type=Path, help="a file of the same shape the headline figures come from")
    data.add_argument("--sequence-column", default="sequence", help="CSV/Parquet: the sequence id column")
    data.add_argument(
        "--order-column", default="step", help="CSV/Parquet: the step order column ('' for file order)"
    )
    data.add_argument("--target-column", default="target", help="CSV/Parquet: the target column")
    data.add_argument("--features", help="CSV/Parquet: comma list of feature columns (default: the rest)")
    data.add_argument("--objective", choices=["classification", "regression"], default="classification")
    data.add_argument(
        "--answer",
        choices=["last", "every"],
        default="last",
        help="one target per sequence: trained at its last step, or at every step (an answer as it arrives)",
    )
    data.add_argument(
        "--validation-fraction", type=_fraction, default=0.2, help="held out for early stopping (0.2)"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _add_export(sub: Subparsers) -> None:
    p = _command(
        sub, "export", "Export a trained artifact to ONNX with its state explicit, verified.", commands.export
    )
    p.add_argument("artifact", type=Path, help="artifact directory holding checkpoint.pt")


def _add_card(sub: Subparsers) -> None:
    help_text = "Write a model card for a recurrent ONNX file exported elsewhere, once it proves it streams."
    p = _command(sub, "card", help_text, commands.card)
    p.add_argument("onnx", type=Path, help="the ONNX file, its state as explicit inputs and outputs")
    p.add_argument(
        "--out", type=Path, help="artifact directory to write (default: the file's path, no .onnx)"
    )
    pair_help = "a state input and the output it pairs with, e.g. h0:hn (repeat; default: paired by name)"
    p.add_argument("--state", action="append", type=_pair, default=[], metavar="IN:OUT", help=pair_help)
    p.add_argument("--input", help="the input sequence's name (default: the one input that is not state)")
    p.add_argument("--output", help="the output sequence's name (default: the one output that is not state)")
    constant_help = "an input fed VALUE on every run, e.g. sr=16000 (repeat; comma-separated for a tensor)"
    p.add_argument(
        "--constant", action="append", type=_constant, default=[], metavar="NAME=VALUE", help=constant_help
    )
    window_help = "the graph takes windows of a sample stream: SAMPLES new per run (clients send any number)"
    p.add_argument("--window", type=_positive, help=window_help)
    p.add_argument(
        "--context",
        type=int,
        default=0,
        help="with --window: samples of the stream before each window it takes",
    )
    p.add_argument("--vocabulary-size", type=_positive, help="token models (int64 input): ids are below it")
    p.add_argument("--labels", help="comma-separated names of the outputs")
    p.add_argument("--meaning", default="model outputs", help="what the outputs are, for people")
    p.add_argument("--name", help="model name (default: the artifact directory's name)")
    p.add_argument("--task", default="custom", help="what the model is for, one word")


def _pair(text: str) -> tuple[str, str]:
    state_input, _, state_output = text.partition(":")
    if not state_input or not state_output:
        raise argparse.ArgumentTypeError(f"expected IN:OUT, e.g. h0:hn, got {text!r}")
    return state_input, state_output


def _constant(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. sr=16000, got {text!r}")
    return name, value


def _add_experiment(sub: Subparsers) -> None:
    p = _command(sub, "experiment", "Run an experiment (gap-sweep: LSTM vs GRU vs RNN).", commands.experiment)
    p.add_argument("name", choices=["gap-sweep"])
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--quick", action="store_true", help="a reduced grid that runs in minutes")


def _add_serve(sub: Subparsers) -> None:
    p = _command(
        sub, "serve", "Serve an exported model over gRPC (flags override CONVEYOR_* env).", commands.serve
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="artifact directory with model.onnx and model.json")
    source.add_argument(
        "--models", type=Path, help="a model repository, DIR/<name>/<version>/ (docs/repository.md), watched"
    )
    p.add_argument(
        "--drain-deadline", type=float, help="seconds a replaced version serves its sessions before they end"
    )
    p.add_argument("--host", help="address to bind, e.g. 0.0.0.0")
    p.add_argument("--port", type=int, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    p.add_argument("--max-batch-size", type=int, help="largest batch across sessions (1: no batching)")
    p.add_argument(
        "--max-delay-ms", type=float, help="longest wait to fill a batch (0: batch what is waiting)"
    )
    p.add_argument("--max-sessions", type=int, help="session capacity")
    p.add_argument("--idle-ttl-s", type=float, help="idle time after which a session expires")
    p.add_argument("--tls-cert", help="PEM certificate for TLS on the gRPC port (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, only clients with a certificate it signed")
    p.add_argument("--tokens-file", help="tenants: a file of token digests (conveyor token makes lines)")


def _add_stream(sub: Subparsers) -> None:
    p = _command(sub, "stream", "Stream a sequence to a Conveyor server, chunk by chunk.", commands.stream)
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument(
        "input",
        nargs="?",
        default="-",
        help="text (token models), .csv or .npy (feature models); - for stdin",
    )
    p.add_argument("--chunk-steps", type=int, default=8, help="timesteps per chunk")
    p.add_argument("--session", help="session id (default: issued by the server)")
    p.add_argument(
        "--offset", type=int, help="go on with a live session (one left open by --keep) at this offset"
    )
    p.add_argument("--top", type=int, default=3, help="predictions shown per chunk (token models)")
    p.add_argument("--output", type=Path, help="write every timestep's outputs to this .npy file")
    p.add_argument("--keep", action="store_true", help="leave the session open at the end")
    p.add_argument("--ca", type=Path, help="TLS: trust this PEM CA (else, with --tls, the system's roots)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's roots (implied by --ca, --cert)")
    p.add_argument("--cert", type=Path, help="mutual TLS: this client's PEM certificate (with --key)")
    p.add_argument("--key", type=Path, help="mutual TLS: the private key of --cert")
    p.add_argument("--token", help="bearer token, for a server with tenants (or CONVEYOR_TOKEN)")
    p.add_argument("--model", help="the model, on a server of several (conveyor models lists them)")
    p.add_argument("--model-version", help="the version to begin on, a number or label (default: newest)")


def _add_models(sub: Subparsers) -> None:
    help_text = "List the models a server holds, each version with its state, labels and sessions."
    p = _command(sub, "models", help_text, commands.models)
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--token", help="bearer token, for a server with tenants (or CONVEYOR_TOKEN)")


def _add_demo(sub: Subparsers) -> None:
    p = _command(sub, "demo", "The France -> French story through a real server.", commands.demo)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where models live")


def _add_vad(sub: Subparsers) -> None:
    help_text = "Stream a WAV file to a voice-activity model in 20 ms frames; print its speech segments."
    p = _command(sub, "vad", help_text, commands.vad)
    p.add_argument("wav", type=Path, help="16-bit PCM mono WAV at the model's rate")
    p.add_argument("--target", help="a running server, HOST:PORT (default: start one for --model)")
    p.add_argument("--model", type=Path, default=Path("artifacts/silero-vad-16k"), help="the VAD artifact")
    p.add_argument("--frame-ms", type=float, default=20.0, help="audio per chunk, as a call sends it")
    p.add_argument("--realtime", action="store_true", help="send each frame when its audio would arrive")


def _add_token(sub: Subparsers) -> None:
    help_text = "Make a bearer token for a tenant; print it, and the line for the server's tokens file."
    p = _command(sub, "token", help_text, commands.token)
    p.add_argument("--tenant", required=True, help="tenant name: 1-64 characters of A-Z a-z 0-9 . _ -")
    p.add_argument("--max-sessions", type=_positive, help="the tenant's session quota (default: none)")


def _add_bench(sub: Subparsers) -> None:
    from serving.bench.cli import add_arguments  # light: imports neither grpc nor numpy

    help_text = "Throughput, latency, CPU and memory against their floors."
    add_arguments(_command(sub, "bench", help_text, commands.bench))


def _add_soak(sub: Subparsers) -> None:
    from serving.bench.soak.cli import add_arguments  # light: imports neither grpc nor numpy

    help_text = "Minutes of mixed traffic (bad requests included): answers by code, the server's memory."
    add_arguments(_command(sub, "soak", help_text, commands.soak))


if __name__ == "__main__":
    sys.exit(main())
