"""`python -m serving.bench`: the bench without the `conveyor` CLI (the same flags as `conveyor bench`)."""

import argparse
import sys

from serving.bench.cli import add_arguments, run
from serving.bench.grid import BenchError

parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__)
add_arguments(parser)
try:
    run(parser.parse_args())
except BenchError as exc:
    sys.exit(f"bench: error: {exc}")
