"""The session store a configuration names: in this process's memory (the default), or Redis."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serving.domain.chunks import ServedModel
from serving.domain.sessions.memory import InMemorySessionStore
from serving.domain.sessions.store import SessionStore
from serving.server.config import ServerConfig
from serving.server.redis_store import RedisSessionStore, StoreMetrics


@dataclass(frozen=True)
class OpenedStore:
    """A store ready for use, the clock its sessions are timed on, and how to close it."""

    store: SessionStore
    # Monotonic in one process; wall time when servers share the store (their monotonic clocks differ).
    clock: Callable[[], float]
    close: Callable[[], Awaitable[None]]


async def open_store(
    config: ServerConfig, model: ServedModel, metrics: StoreMetrics, version: str = ""
) -> OpenedStore:
    """Open `config.store` for the sessions of one model version (`version` "name/number" from a model
    repository; empty for the one-model server); `StoreUnavailableError` when a Redis store cannot be
    reached."""
    if config.store == "memory":
        return OpenedStore(InMemorySessionStore(model.state_shape), time.monotonic, _nothing)
    store = await RedisSessionStore.connect(
        config.store,
        # Per model and version: a session of another model, or of another version of this one (the same
        # weights published twice included), is not found here, never misread as this one's state.
        prefix=f"conveyor:{model.spec.fingerprint[:16]}:" + (f"{version}:" if version else ""),
        state_shape=model.state_shape,
        idle_ttl_s=config.idle_ttl_s,
        metrics=metrics,
    )
    return OpenedStore(store, time.time, store.close)


async def _nothing() -> None:
    return None
