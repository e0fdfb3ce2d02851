"""The Redis session store: sessions that outlive their process and are shared by every replica.

Layout, under a prefix that names the model (a session of another model is not found, never misread):
    {prefix}s:{id}   hash: steps, created, used (clock seconds), state (float32 LE bytes), replay
    {prefix}used     sorted set: id by last use (the LRU order, and the idle-TTL sweep)
    {prefix}born     sorted set: id by creation (the lifetime sweep)
Every write is a Lua script, so each is atomic; `replace` writes only if `steps` is what the caller read (the
compare-and-set that keeps two replicas from both applying one offset). The hash also carries a Redis TTL a
little past the idle TTL, so sessions vanish even if no replica is left to sweep them.

One round trip per event-loop pass, not per call: calls made while a round trip is out queue up and go
together in the next pipeline (the chunks of one batch commit in one round trip).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import redis.asyncio as redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from serving.domain.errors import StoreUnavailableError
from serving.domain.sessions.store import Cutoffs, EndReason, Expired, HeldBytes, Session, Successors
from serving.server.redis_scripts import SCRIPTS, decode_replay, encode_replay

SWEEP_SLICE = 2000  # sessions one expire script looks at
_HUGE = 1e300  # Lua's tonumber does not read "inf"


class StoreMetrics(Protocol):
    """What the Redis store reports; `serving.server.metrics.ConveyorMetrics` implements it."""

    def observe_store_round_trip(self, seconds: float, operations: int) -> None:
        """One pipeline of `operations` calls took `seconds`."""

    def store_error(self, kind: str) -> None:
        """A round trip failed: "unreachable" (connection, timeout) or "refused" (an error reply)."""


class _Call(NamedTuple):
    """One script call waiting for the next round trip."""

    digest: str  # the script's SHA1
    keys: int  # how many of `arguments` are keys
    arguments: tuple[Any, ...]
    future: asyncio.Future[Any]


class RedisSessionStore:
    """Sessions in Redis at `url`, under `prefix`, with states of `state_shape`."""

    durable = True

    def __init__(
        self, client: redis.Redis, *, prefix: str, state_shape: tuple[int, ...], idle_ttl_s: float,
        metrics: StoreMetrics,
    ) -> None:  # fmt: skip
        self._client = client
        self._prefix = prefix
        self._used, self._born = f"{prefix}used", f"{prefix}born"
        self._shape = state_shape
        self._ttl_ms = str(int(idle_ttl_s * 1000) + 60_000)  # a backstop: the sweep ends sessions first
        self._metrics = metrics
        # Called by digest (EVALSHA): a script's text travels once, when it is loaded.
        self._digests = {name: hashlib.sha1(lua.encode()).hexdigest() for name, lua in SCRIPTS.items()}
        self._queue: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._count = 0  # live sessions, as of the last sweep and this server's own creates and ends

    @classmethod
    async def connect(
        cls, url: str, *, prefix: str, state_shape: tuple[int, ...], idle_ttl_s: float, metrics: StoreMetrics
    ) -> RedisSessionStore:
        """A store on a reachable Redis; `StoreUnavailableError` (saying why) when it cannot be reached."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        )
        store = cls(client, prefix=prefix, state_shape=state_shape, idle_ttl_s=idle_ttl_s, metrics=metrics)
        try:
            await store._load_scripts()
            store._count = int(await client.zcard(store._used))
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailableError(f"cannot reach {_redacted(url)}: {exc}") from exc
        return store

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def get(self, session_ids: Sequence[str], now: float) -> list[Session | None]:
        """Each session as it was before this look-up (None: none), which is a use: its last use becomes
        `now`. One round trip for them all."""
        calls = [
            self._queue_script("get", [self._key(session_id), self._used], [now, session_id, self._ttl_ms])
            for session_id in session_ids
        ]
        return [None if fields is None else self._decode(fields) for fields in await asyncio.gather(*calls)]

    async def create(self, session_id: str, session: Session) -> bool:
        """Add `session` unless `session_id` is taken; False (nothing written) when it is."""
        created = bool(await self._queue_write(session_id, session, None))
        self._count += created
        return created

    async def replace(self, successors: Successors) -> list[bool]:
        """Swap in each successor whose stored session has consumed its expected steps; False (nothing
        written for it) for the others. One round trip for them all."""
        calls = [
            self._queue_write(session_id, successors.session(row), successors.expected[row])
            for row, session_id in enumerate(successors.session_ids)
        ]
        return [bool(written) for written in await asyncio.gather(*calls)]

    async def end(self, session_id: str) -> Session | None:
        """Remove a session and return it; None when there was none."""
        fields = await self._queue_script(
            "end", [self._key(session_id), self._used, self._born], [session_id]
        )
        if fields is None:
            return None
        self._count = max(self._count - 1, 0)
        return self._decode(fields)

    async def expire(self, cutoffs: Cutoffs) -> AsyncIterator[list[Expired]]:
        """Remove the sessions past their idle TTL or lifetime, `SWEEP_SLICE` at a time. Replays stay with
        their session until it ends (`cutoffs.replay_s` is not applied here)."""
        args = [min(cutoffs.used_s, _HUGE), min(cutoffs.created_s, _HUGE), SWEEP_SLICE, self._key("")]
        more = True
        while more:
            reply = await self._queue_script("expire", [self._used, self._born], args)
            more, self._count = bool(reply[0]), int(reply[1])
            rows = reply[2:]
            yield [
                (_text(rows[i]), self._decode(rows[i + 2]), EndReason(_text(rows[i + 1])))
                for i in range(0, len(rows), 3)
            ]

    async def least_recent(self) -> str | None:
        """The id of the session used longest ago; None when there is none."""
        ids = await self._queue_script("oldest", [self._used], [])
        return _text(ids[0]) if ids else None

    def __len__(self) -> int:
        """Live sessions in the store as of this server's last sweep (other replicas' changes lag by one)."""
        return self._count

    def held_bytes(self) -> HeldBytes:
        """Nothing: states and replays are in Redis (its own INFO memory tells their size)."""
        return HeldBytes(0, 0)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}s:{session_id}"

    def _queue_write(self, session_id: str, session: Session, steps: int | None) -> asyncio.Future[Any]:
        """Queue the write of `session` if the stored one has consumed `steps` (None: if there is none)."""
        state, replay = session.state, session.replay
        if state.shape != self._shape or state.dtype != np.float32:
            raise ValueError(f"state must be float32 {self._shape}, got {state.dtype} {state.shape}")
        args = [
            session_id, session.steps, repr(session.created_s), repr(session.last_used_s),
            state.astype("<f4", copy=False).tobytes(), b"" if replay is None else encode_replay(replay),
            self._ttl_ms, "" if steps is None else str(steps),
        ]  # fmt: skip
        return self._queue_script("write", [self._key(session_id), self._used, self._born], args)

    def _queue_script(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue script `name` for the next round trip; its reply resolves the future returned."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(self._digests[name], len(keys), (*keys, *args), future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return future

    async def _load_scripts(self) -> None:
        for lua in SCRIPTS.values():
            await self._client.script_load(lua)

    async def _flush(self) -> None:
        """Send what is queued as one pipeline; whatever was queued meanwhile goes in the next one."""
        try:
            while self._queue:
                calls, self._queue = self._queue, []
                await self._round_trip(calls)
        finally:
            self._flusher = None

    async def _round_trip(self, calls: list[_Call]) -> None:
        started = time.perf_counter()
        try:
            results = await self._execute(calls)
            lost = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if lost:  # Redis restarted and forgot the scripts: those calls did not run; load and resend them
                await self._load_scripts()
                for i, result in zip(lost, await self._execute([calls[i] for i in lost]), strict=True):
                    results[i] = result
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._metrics.store_error("unreachable")
            _fail(calls, StoreUnavailableError(f"{type(exc).__name__}: {exc}"))
            return
        self._metrics.observe_store_round_trip(time.perf_counter() - started, len(calls))
        for call, result in zip(calls, results, strict=True):
            if call.future.done():
                continue
            if isinstance(result, ResponseError):  # e.g. out of memory, or a read-only replica
                self._metrics.store_error("refused")
                call.future.set_exception(StoreUnavailableError(f"Redis refused the write: {result}"))
            else:
                call.future.set_result(result)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.digest, call.keys, *call.arguments)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _decode(self, fields: list[Any]) -> Session:
        steps, created, used, state, replay = fields
        array = np.frombuffer(state or b"", "<f4")
        if array.size != np.prod(self._shape):
            array = np.zeros(self._shape, np.float32)  # only a session that vanished mid-sweep has none
        return Session(
            array.reshape(self._shape),
            int(steps or 0),
            float(created or 0.0),
            float(used or 0.0),
            decode_replay(replay) if replay else None,
        )


def _fail(calls: list[_Call], error: Exception) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redacted(url: str) -> str:
    """The URL without a password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url
