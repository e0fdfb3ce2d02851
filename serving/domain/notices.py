"""End notices: which streams used which sessions, so each is told, in band, when one of them ends."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable

from serving.domain.chunks import split_key
from serving.domain.sessions.store import SessionEnd

Watcher = Callable[[SessionEnd], None]


class EndNotices:
    """A `Sessions` listener that passes each session's end on to the watchers of that session."""

    def __init__(self) -> None:
        # Most sessions are watched by one stream: that watcher is the value itself, a set only for several.
        self._watchers: dict[str, Watcher | set[Watcher]] = {}

    def watch(self, session_ids: Iterable[str], watcher: Watcher) -> None:
        """Tell `watcher` when each of `session_ids` ends."""
        for session_id in session_ids:
            watchers = self._watchers.setdefault(session_id, watcher)
            if isinstance(watchers, set):
                watchers.add(watcher)
            elif watchers != watcher:
                self._watchers[session_id] = {watchers, watcher}

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher) -> None:
        """Stop telling `watcher` about these sessions (its stream has closed)."""
        for session_id in session_ids:
            watchers = self._watchers.get(session_id)
            if isinstance(watchers, set):
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[session_id]
            elif watchers == watcher:
                del self._watchers[session_id]

    def __call__(self, ended: SessionEnd) -> None:
        """Tell the session's watchers that it ended, and forget them."""
        watchers = self._watchers.pop(ended.session_id, None)
        if watchers is not None:
            # Watchers know sessions by the ids their clients gave, not by their keys.
            ended = dataclasses.replace(ended, session_id=split_key(ended.session_id)[1])
            # Told soon, not now: a chunk that ended its session is answered before the notice goes out.
            loop = asyncio.get_running_loop()
            for watcher in watchers if isinstance(watchers, set) else (watchers,):
                loop.call_soon(watcher, ended)
