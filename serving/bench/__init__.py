"""`conveyor bench`: throughput, latency, CPU and memory of the server against its floors.

    from serving.bench.run import run_bench            # BenchOptions -> list[Row]
    from serving.bench.memory import run_memory        # MemoryOptions -> MemoryResult
    from serving.bench.cli import add_arguments, run   # the `conveyor bench` flags and their handler

This module stays light (no grpc, numpy or onnxruntime), so the CLI can build its parser cheaply.
"""

from serving.bench.grid import BenchError, BenchOptions, Row

__all__ = ["BenchError", "BenchOptions", "Row"]
