"""Tenants: bearer tokens that name who is calling, from a token file that holds only their digests.

Token file, one tenant a line (`#` starts a comment):
    <sha256 of the token, hex>  <tenant name>  [<most sessions it may hold>]
`conveyor token --tenant NAME` makes a token and prints its line. A token is never stored or logged: the
server keeps the digests, and compares the digest of what a call presents.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from serving.domain.errors import UnauthenticatedError
from serving.server.config import ConfigError

_LINE = re.compile(r"(?P<digest>[0-9a-f]{64})\s+(?P<tenant>[A-Za-z0-9._-]{1,64})(?:\s+(?P<quota>\d+))?")
_BEARER = "bearer "


@dataclass(frozen=True)
class Tenant:
    """Who a token belongs to, and how many sessions it may hold (None: only the server's capacity)."""

    name: str
    max_sessions: int | None


class Tenants:
    """The tenants of a token file, by token digest."""

    def __init__(self, by_digest: dict[str, Tenant]) -> None:
        self._by_digest = by_digest

    @classmethod
    def load(cls, path: str) -> Tenants:
        """Read a token file; `ConfigError` naming the line that is not `digest tenant [quota]`."""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"tokens_file ({path}) cannot be read: {exc.strerror}") from exc
        by_digest: dict[str, Tenant] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            match = _LINE.fullmatch(text)
            if match is None:
                raise ConfigError(
                    f"tokens_file ({path}) line {number} is not '<sha256 hex> <tenant> [<max sessions>]'"
                )
            quota = match["quota"]
            by_digest[match["digest"]] = Tenant(match["tenant"], None if quota is None else int(quota))
        if not by_digest:
            raise ConfigError(f"tokens_file ({path}) names no tenant: every call would be refused")
        return cls(by_digest)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenant:
        """The tenant whose token the call's metadata carries; `UnauthenticatedError` otherwise."""
        header = next((str(value) for key, value in metadata if key == "authorization"), None)
        if header is None or not header.lower().startswith(_BEARER):
            raise UnauthenticatedError("no bearer token")
        tenant = self._by_digest.get(digest(header[len(_BEARER) :].strip()))
        if tenant is None:
            raise UnauthenticatedError("the bearer token is not one of this server's")
        return tenant

    def quotas(self) -> dict[str, int]:
        """Tenant -> most sessions, for the tenants that have a quota."""
        return {t.name: t.max_sessions for t in self._by_digest.values() if t.max_sessions is not None}


def digest(token: str) -> str:
    """What the token file holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(tenant: str, max_sessions: int | None = None) -> tuple[str, str]:
    """A fresh random token for `tenant`, and the token-file line that admits it."""
    token = secrets.token_urlsafe(32)
    line = f"{digest(token)} {tenant}" + ("" if max_sessions is None else f" {max_sessions}")
    if _LINE.fullmatch(line) is None:
        raise ConfigError(f"tenant names are 1-64 characters of A-Z a-z 0-9 . _ -, not {tenant!r}")
    return token, line
