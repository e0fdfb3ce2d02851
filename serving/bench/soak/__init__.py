"""`conveyor soak`: the server under minutes of mixed traffic, every answer judged, its memory watched.

Sessions open, stream chunks over the Stream RPC and unary Step calls, idle, drop their connection and go on
over a new one, resend a chunk (a retry, which must be answered as an identical replay), end or are left to
expire; bad requests are mixed in, each with the status code the contract gives it. Every answer is counted by
code as expected or unexpected, every session that got through is checked against a one-chunk run of its
whole sequence, and the server's resident memory is sampled throughout.

    from serving.bench.soak.run import run_soak            # SoakOptions -> SoakResult
    from serving.bench.soak.cli import add_arguments, run  # the `conveyor soak` flags and their handler

This module, `options` and `cli` stay light (no grpc or numpy), so the CLI can build its parser cheaply.
"""

from serving.bench.soak.options import SoakOptions

__all__ = ["SoakOptions"]
