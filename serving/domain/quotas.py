"""Tenants' session quotas on this server: how many sessions each holds, against the most it may hold."""

from __future__ import annotations

import collections
from collections.abc import Mapping

from serving.domain.chunks import split_key
from serving.domain.errors import QuotaExceededError
from serving.domain.sessions.store import SessionEnd


class Quotas:
    """Counts each tenant's sessions as they start and end (a lifecycle listener); refuses one over quota."""

    def __init__(self, quotas: Mapping[str, int]) -> None:
        self._quotas = quotas  # tenant -> most sessions it may hold on this server
        self._held: collections.Counter[str] = collections.Counter()  # tenant -> sessions it holds here

    def check(self, namespace: str) -> None:
        """Raise `QuotaExceededError` if tenant `namespace` may start no more sessions."""
        quota = self._quotas.get(namespace)
        if quota is not None and self._held[namespace] >= quota:
            raise QuotaExceededError(namespace, quota)

    def started(self, namespace: str) -> None:
        """Tenant `namespace` started a session."""
        self._held[namespace] += 1

    def __call__(self, ended: SessionEnd) -> None:
        """A session ended: its tenant holds one fewer."""
        namespace = split_key(ended.session_id)[0]
        if self._held[namespace] > 0:
            self._held[namespace] -= 1
