"""What the load process's jobs share: channels, stubs, request inputs, and the lines they tell the parent."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import grpc
import numpy as np

from serving.wire import pb, pb_grpc
from serving.wire.tensors import encode

# Separate subchannel pools: otherwise grpc shares one connection among channels to the same target.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
Job = dict[str, Any]


def stub(channel: grpc.aio.Channel) -> pb_grpc.ConveyorAsyncStub:
    """The raw generated stub on an asyncio channel."""
    return cast("pb_grpc.ConveyorAsyncStub", pb_grpc.ConveyorStub(channel))


def inputs_maker(info: pb.ModelInfo, rng: np.random.Generator) -> Callable[[int], pb.Tensor]:
    """A function of `steps` giving random valid inputs for the model `info` describes."""

    def make(steps: int) -> pb.Tensor:
        if info.input_kind == "tokens":
            return encode(rng.integers(0, info.input_size, steps, dtype=np.int64))
        return encode(rng.standard_normal((steps, info.input_size)).astype(np.float32))

    return make


def say(word: str) -> None:
    """Tell the parent process `word` (a line on stdout)."""
    sys.stdout.write(word + "\n")
    sys.stdout.flush()
