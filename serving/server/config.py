"""The server's configuration: a frozen dataclass, read from `CONVEYOR_*` environment variables by `from_env`.

Each field `name` is set by the variable `CONVEYOR_<NAME>` (e.g. `max_delay_ms` <- `CONVEYOR_MAX_DELAY_MS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "CONVEYOR_"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_STORE_FORMS = '"memory" or a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://PATH)'


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable and the expected form."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `build_server` needs. Times carry their unit in the name; 0 ports bind a free port."""

    # The one model served: an artifact directory holding model.onnx + model.json. Or, instead, a model
    # repository (docs/repository.md): DIR/<name>/<version>/ artifact directories, watched while serving.
    model_dir: Path | None = None
    models_dir: Path | None = None
    repository_poll_s: float = 2.0  # how often the model repository is looked at for new or removed versions
    # A draining version (replaced by a newer one) serves its live sessions this long at most; then the
    # sessions left end with reason model_retired and it is unloaded.
    drain_deadline_s: float = 600.0
    host: str = "127.0.0.1"  # interface for gRPC and /metrics; containers set 0.0.0.0
    port: int = 50051  # gRPC
    metrics_port: int = 9464  # Prometheus /metrics over HTTP
    max_batch_size: int = 64  # sessions per runner call; 1 disables cross-session batching
    max_delay_ms: float = 0.0  # extra wait for a batch to fill; 0 batches only what is already waiting
    # Batches predicted to take less run on the event loop's thread, saving a thread hand-off (two wake-ups,
    # and the two threads' turns at the GIL) while holding the loop that long at most; the default is the
    # value measured best in docs/benchmarks.md. 0 runs every batch on the runner thread, so even a runtime
    # that hangs cannot hold up the loop.
    inline_batch_max_ms: float = 2.0
    max_chunk_steps: int = 1024  # longest accepted chunk, in timesteps
    idle_ttl_s: float = 600.0  # a session unused this long expires
    session_lifetime_s: float = 86400.0  # a session older than this ends, however busy
    max_sessions: int = 10000  # live sessions held at once
    evict_lru_at_capacity: bool = False  # at capacity: evict the least recently used session, else reject
    sweep_interval_s: float = 1.0  # how often expired sessions are looked for
    replay_window_s: float = 60.0  # how long a session keeps its last response to answer a retry
    replay_max_bytes: int = 65536  # the largest last response a session keeps (larger: digest only)
    max_inflight_per_stream: int = 256  # unanswered chunks one stream may have before it is read no further
    # Bytes one stream may hold for chunks not yet answered and answers not yet sent (each chunk counts its
    # request and the largest response it can get), before it is read no further; one chunk always fits.
    stream_max_bytes: int = 4 << 20
    max_streams: int = 1000  # streams open at once; one more is RESOURCE_EXHAUSTED
    ort_intra_op_threads: int = 1  # ONNX Runtime threads per batch; parallelism comes from batching
    # A batch of 32 rows or more runs as this many ONNX Runtime calls at once, each on its share of the rows
    # (ORT runs without the GIL). On 2 cores, 2 calls: silero VAD frames held 384 streams against 288, frames
    # of 256 x 32 steps (LSTM 1 x 256) 191k steps/s against 123k (docs/benchmarks.md). 1 on a one-core host.
    ort_parallel_calls: int = 2
    grace_s: float = 10.0  # on stop, how long in-flight chunks get to finish
    # Where sessions live: "memory" (this process only) or a Redis URL (redis://host:6379/0, rediss://, unix://),
    # which every replica serving the same model shares and which keeps sessions across restarts.
    store: str = "memory"
    # TLS on the gRPC port: the server's certificate and key (PEM files); with a client CA, mutual TLS (only
    # clients holding a certificate that CA signed get in). Empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Tenants: a file of token digests (serving/server/auth.py). Set, every Conveyor call needs a bearer token
    # and each tenant's sessions are its own; empty, no authentication.
    tokens_file: str = ""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            _check(name, 0 <= getattr(self, name) <= 65535, "a port in 0..65535 (0 binds a free port)")
        for name in (
            "max_batch_size",
            "max_chunk_steps",
            "max_sessions",
            "max_inflight_per_stream",
            "stream_max_bytes",
            "max_streams",
            "replay_max_bytes",
            "ort_parallel_calls",
        ):
            _check(name, getattr(self, name) >= 1, "an integer >= 1")
        _check("ort_intra_op_threads", self.ort_intra_op_threads >= 0, "an integer >= 0 (0: ORT decides)")
        _check(
            "model_dir",
            (self.model_dir is None) != (self.models_dir is None),
            "set, or models_dir instead (exactly one of the two)",
        )
        for name in (
            "idle_ttl_s",
            "session_lifetime_s",
            "sweep_interval_s",
            "replay_window_s",
            "repository_poll_s",
        ):
            _check(name, getattr(self, name) > 0, "a number of seconds > 0")
        for name in ("max_delay_ms", "inline_batch_max_ms", "grace_s", "drain_deadline_s"):
            _check(name, getattr(self, name) >= 0, "a number >= 0")
        _check("store", self.store == "memory" or self.store.startswith(_REDIS_SCHEMES), _STORE_FORMS)
        _check("tls_key", bool(self.tls_cert) == bool(self.tls_key), "set together with tls_cert")
        _check("tls_client_ca", not self.tls_client_ca or bool(self.tls_cert), "set only with tls_cert")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> ServerConfig:
        """Build a config from `CONVEYOR_*` variables in `env`; `overrides` (e.g. CLI flags) win over them.

        Raises `ConfigError` naming the variable when a value does not parse or is out of range, or when
        neither `CONVEYOR_MODEL_DIR` nor `CONVEYOR_MODELS_DIR` (nor an override of either) is given.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = ENV_PREFIX + field.name.upper()
            if variable in env:
                values[field.name] = _parse(variable, env[variable], str(field.type))
        values.update(overrides)
        if values.get("model_dir") is None and values.get("models_dir") is None:
            raise ConfigError(
                f"{ENV_PREFIX}MODEL_DIR is not set: give the artifact directory (model.onnx, model.json), or "
                f"{ENV_PREFIX}MODELS_DIR, a model repository"
            )
        return cls(**values)


def _check(name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} (env {ENV_PREFIX}{name.upper()}) must be {expected}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "Path | None": Path,
    "str": str,
    "int": int,
    "float": float,
    "bool": _parse_bool,
}


def _parse(variable: str, text: str, type_name: str) -> Any:
    try:
        return _PARSERS[type_name](text)
    except ValueError as exc:
        raise ConfigError(f"{variable}={text!r} is not a valid {type_name}: {exc}") from exc
