"""Run Triton's perf_analyzer (bundled in the tritonclient wheel of .venv-triton) against a server's Open
Inference Protocol, as a sequence model: each of `concurrency` sequences sends one chunk per request.

    .venv-triton/bin/python scripts/perf_analyzer.py --target HOST:PORT --model NAME --csv OUT.csv \
        [--streaming] [--concurrency 1:64:7] [--sequence-length 300] [--chunk-steps 1] [-- MORE FLAGS]
    .venv-triton/bin/python scripts/perf_analyzer.py --check    # the binary starts: prints its version

What the binary needs, which this script supplies:
- libcudart.so.12 on LD_LIBRARY_PATH even with no GPU: it is linked in, so the loader refuses to start the
  binary without it. The nvidia-cuda-runtime-cu12 wheel in .venv-triton has it. libb64.so.0d comes from
  Debian's libb64-0d (`make triton-client` installs both).
- --shape for the variable time dimension: the model's metadata says [-1 (batch), -1 (time), features...]
  and perf_analyzer drops the batch (max_batch_size 1), so a chunk of 1 step is `x:1` for a token model and
  `x:1,F` for a feature model. Read from the model's metadata here.
- --input-data zero by default: its default, "random", sends int64 token ids of any value, which the
  server rightly refuses ("token id -1420042007188224409 is outside the vocabulary", perf_analyzer exits 99);
  zeros are a valid token id and finite features. A JSON file of your own can replace them.
It has no --help: an unknown flag prints the usage and exits 99. Its usage says -H headers are ignored over
gRPC, so a server that wants a bearer token (tenants) cannot be measured with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import tritonclient.grpc as triton  # type: ignore[import-not-found]  # in .venv-triton only


def binary() -> Path:
    """perf_analyzer as the wheel installed it: its data/bin goes to the venv's bin."""
    return Path(sysconfig.get_path("scripts")) / "perf_analyzer"


def environment() -> dict[str, str]:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-cuda-runtime-cu12 is not installed here: run `make triton-client`")
    cudart = Path(next(iter(spec.submodule_search_locations))) / "lib"
    paths = [str(cudart), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    return os.environ | {"LD_LIBRARY_PATH": ":".join(paths)}


def shape_flag(target: str, model: str, chunk_steps: int) -> str:
    """`--shape` for one chunk: time is variable, so perf_analyzer cannot pick it itself."""
    client = triton.InferenceServerClient(url=target)
    try:
        metadata = client.get_model_metadata(model, as_json=True)
    finally:
        client.close()
    tensor = metadata["inputs"][0]
    features = [str(d) for d in tensor["shape"][2:]]  # past batch and time; int64 dims come as strings
    return f"{tensor['name']}:{','.join([str(chunk_steps), *features])}"


def command(args: argparse.Namespace) -> list[str]:
    shape = args.shape or shape_flag(args.target, args.model, args.chunk_steps)
    flags = [
        *("-i", "grpc", "-u", args.target, "-m", args.model, "-f", str(args.csv)),
        *("--sequence-length", str(args.sequence_length), "--concurrency-range", args.concurrency),
        *("--input-data", args.input_data, "--shape", shape),
        *("--measurement-interval", str(args.measurement_ms)),
    ]
    return [str(binary()), *flags, *(["--streaming"] if args.streaming else []), *args.extra]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only start the binary (--version)")
    parser.add_argument("--target", help="HOST:PORT of the gRPC server")
    parser.add_argument("--model")
    parser.add_argument("--csv", type=Path, help="where perf_analyzer writes its report (-f)")
    parser.add_argument("--streaming", action="store_true", help="one ModelStreamInfer stream per sequence")
    parser.add_argument("--concurrency", default="1:64:7", help="start:end:step (default 1, 8, ..., 64)")
    parser.add_argument("--sequence-length", type=int, default=300, help="requests per sequence (+/- 20%%)")
    parser.add_argument("--chunk-steps", type=int, default=1, help="timesteps per request")
    parser.add_argument("--shape", help="perf_analyzer's --shape, instead of the model's metadata")
    parser.add_argument("--input-data", default="zero", help="zero (default), random or a JSON file")
    parser.add_argument("--measurement-ms", type=int, default=5000)
    parser.add_argument("extra", nargs="*", help="more perf_analyzer flags, after --")
    args = parser.parse_args(argv)
    if not args.check and not (args.target and args.model and args.csv):
        parser.error("--target, --model and --csv are required (or --check)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    argv_run = [str(binary()), "--version"] if args.check else command(args)
    print(" ".join(argv_run), flush=True)
    return subprocess.run(argv_run, env=environment(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
