"""Transport security for the gRPC port: TLS with the server's certificate, and optionally mutual TLS (the
server then accepts only clients whose certificate a given CA signed). /metrics stays plain HTTP, for the
scraper on the private network."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.server.config import ConfigError, ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The credentials `config` asks for; None for a plaintext port. `ConfigError` naming the file that
    cannot be read."""
    if not config.tls_cert:
        return None
    certificate = _read("tls_cert", config.tls_cert)
    key = _read("tls_key", config.tls_key)
    client_ca = _read("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(field: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field} ({path}) cannot be read: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{field} ({path}) is not a PEM file")
    return data
