"""`ServerConfig.from_env`: CONVEYOR_* variables, overrides, and readable errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from serving.server.config import ConfigError, ServerConfig


def test_every_field_has_a_conveyor_variable() -> None:
    env = {
        "CONVEYOR_MODEL_DIR": "/models/language",
        "CONVEYOR_HOST": "0.0.0.0",
        "CONVEYOR_PORT": "6000",
        "CONVEYOR_METRICS_PORT": "6001",
        "CONVEYOR_MAX_BATCH_SIZE": "32",
        "CONVEYOR_MAX_DELAY_MS": "0.5",
        "CONVEYOR_INLINE_BATCH_MAX_MS": "0",
        "CONVEYOR_MAX_CHUNK_STEPS": "256",
        "CONVEYOR_IDLE_TTL_S": "30",
        "CONVEYOR_SESSION_LIFETIME_S": "3600",
        "CONVEYOR_MAX_SESSIONS": "100",
        "CONVEYOR_EVICT_LRU_AT_CAPACITY": "true",
        "CONVEYOR_SWEEP_INTERVAL_S": "0.5",
        "CONVEYOR_REPLAY_WINDOW_S": "10",
        "CONVEYOR_MAX_INFLIGHT_PER_STREAM": "64",
        "CONVEYOR_ORT_INTRA_OP_THREADS": "2",
        "CONVEYOR_ORT_PARALLEL_CALLS": "3",
        "CONVEYOR_GRACE_S": "3",
        "CONVEYOR_STORE": "redis://sessions:6379/2",
        "CONVEYOR_TLS_CERT": "/certs/server.pem",
        "CONVEYOR_TLS_KEY": "/certs/server.key",
        "CONVEYOR_TLS_CLIENT_CA": "/certs/clients.pem",
        "CONVEYOR_TOKENS_FILE": "/secrets/tokens",
        "CONVEYOR_REPLAY_MAX_BYTES": "4096",
        "CONVEYOR_STREAM_MAX_BYTES": "1048576",
        "CONVEYOR_MAX_STREAMS": "50",
        "CONVEYOR_REPOSITORY_POLL_S": "0.5",
        "CONVEYOR_DRAIN_DEADLINE_S": "120",
        "UNRELATED": "ignored",
    }
    config = ServerConfig.from_env(env)
    # Every field but models_dir, the alternative to model_dir (test_a_model_repository_instead_of_one_model)
    assert len(env) - 1 == len(dataclasses.fields(ServerConfig)) - 1
    assert config.model_dir == Path("/models/language") and config.host == "0.0.0.0"
    assert (config.port, config.metrics_port, config.max_batch_size, config.max_chunk_steps) == (
        6000,
        6001,
        32,
        256,
    )
    assert (config.max_delay_ms, config.idle_ttl_s, config.grace_s) == (0.5, 30.0, 3.0)
    assert config.evict_lru_at_capacity is True and config.ort_intra_op_threads == 2
    assert config.ort_parallel_calls == 3
    assert config.inline_batch_max_ms == 0
    assert config.store == "redis://sessions:6379/2"
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        "/certs/server.pem",
        "/certs/server.key",
        "/certs/clients.pem",
    )
    assert config.tokens_file == "/secrets/tokens" and config.replay_max_bytes == 4096
    assert (config.stream_max_bytes, config.max_streams) == (1 << 20, 50)
    assert (config.repository_poll_s, config.drain_deadline_s) == (0.5, 120.0)


def test_a_model_repository_instead_of_one_model() -> None:
    config = ServerConfig.from_env({"CONVEYOR_MODELS_DIR": "/models"})
    assert config.models_dir == Path("/models") and config.model_dir is None
    with pytest.raises(ConfigError, match="exactly one of the two"):
        ServerConfig.from_env({"CONVEYOR_MODELS_DIR": "/models", "CONVEYOR_MODEL_DIR": "/models/language"})


def test_defaults_and_overrides() -> None:
    config = ServerConfig.from_env({"CONVEYOR_PORT": "6000"}, model_dir=Path("m"), port=7000)
    assert config.port == 7000 and config.model_dir == Path("m")
    assert config.idle_ttl_s == 600 and config.max_delay_ms == 0 and config.evict_lru_at_capacity is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "CONVEYOR_MODEL_DIR is not set"),
        ({"CONVEYOR_PORT": "http"}, "CONVEYOR_PORT='http' is not a valid int"),
        (
            {"CONVEYOR_EVICT_LRU_AT_CAPACITY": "maybe"},
            "CONVEYOR_EVICT_LRU_AT_CAPACITY='maybe' is not a valid bool",
        ),
        ({"CONVEYOR_PORT": "70000"}, r"port \(env CONVEYOR_PORT\) must be a port in 0..65535"),
        ({"CONVEYOR_MAX_BATCH_SIZE": "0"}, "max_batch_size .* must be an integer >= 1"),
        ({"CONVEYOR_IDLE_TTL_S": "0"}, "idle_ttl_s .* must be a number of seconds > 0"),
        ({"CONVEYOR_MAX_DELAY_MS": "-1"}, "max_delay_ms .* must be a number >= 0"),
        ({"CONVEYOR_INLINE_BATCH_MAX_MS": "-0.1"}, "inline_batch_max_ms .* must be a number >= 0"),
        (
            {"CONVEYOR_STORE": "postgres://db"},
            r'store \(env CONVEYOR_STORE\) must be "memory" or a Redis URL',
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_env({"CONVEYOR_MODEL_DIR": "m", **env} if env else env)
