"""The Conveyor Python client: sessions that hide offsets and retries, over the conveyor.v1 gRPC API.

    from serving.client import ConveyorClient          # synchronous: one unary Step call per chunk
    from serving.client import AsyncConveyorClient     # asyncio: many sessions multiplexed on one Stream

The client side of the wire: it imports nothing of the server, so it installs and runs apart from it.
"""

from serving.client.aio import AsyncConveyorClient, AsyncSession
from serving.client.core import (
    ClientOptions,
    ConveyorError,
    ModelInfo,
    ModelVersion,
    Outputs,
    RetryPolicy,
    Snapshot,
    Tls,
)
from serving.client.sync import ConveyorClient, Session

__all__ = [
    "AsyncConveyorClient",
    "AsyncSession",
    "ClientOptions",
    "ConveyorClient",
    "ConveyorError",
    "ModelInfo",
    "ModelVersion",
    "Outputs",
    "RetryPolicy",
    "Session",
    "Snapshot",
    "Tls",
]
