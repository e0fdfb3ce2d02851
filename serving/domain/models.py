"""The models a server holds, each in versions, and which version a chunk runs on.

Every loaded version has an engine of its own (its sessions, its store, its batch queue), so sessions of two
versions never share a runtime batch and a small version waits for its own batches, never a busy one's. A
session is pinned to the version its start chunk resolved to (a number, a label, or the newest ready version)
and never changes version: a later chunk goes to the version that holds it, found in a bounded cache of pins
or, missing there (another replica started it, or the cache dropped it), by asking the live versions, newest
first.

A version moves loading -> ready -> draining -> retired (or loading -> failed). A draining version takes no
new sessions and serves its live ones until they end; past the drain deadline it is retired anyway, and the
sessions left end with reason model_retired. Who loads and drains versions (the repository watcher, or the
one-model server) is not this module's concern.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from serving.domain.backlog import Backlog
from serving.domain.chunks import Chunk, ChunkResult, ServedModel, session_key
from serving.domain.engine import Engine
from serving.domain.errors import (
    ModelNotNamedError,
    ModelNotServedError,
    SessionNotServedError,
    SessionPinnedError,
    VersionRetiredError,
    VersionUnavailableError,
)
from serving.domain.frames import Frame, FrameOutcome
from serving.domain.notices import Watcher
from serving.domain.sessions.store import EndReason, SessionEnd

logger = logging.getLogger(__name__)


class VersionState(enum.Enum):
    """Where a version is in its life; the values are the `state` label of `conveyor_model_info`."""

    LOADING = "loading"
    READY = "ready"  # takes new sessions
    DRAINING = "draining"  # serves its live sessions, takes no new ones
    RETIRED = "retired"  # unloaded
    FAILED = "failed"  # did not load


@dataclass
class Version:
    """One version of one model: its engine while loaded (None while loading, failed or retired)."""

    name: str
    number: int
    fingerprint: str = ""
    engine: Engine | None = None
    release: Callable[[], Awaitable[None]] | None = None  # frees what serving it held (store, batch queue)
    state: VersionState = VersionState.LOADING
    draining_since: float | None = None
    message: str = ""  # why it failed
    labels: tuple[str, str] = field(init=False)  # (name, number as text): how its metrics are labelled

    def __post_init__(self) -> None:
        self.labels = (self.name, str(self.number))

    @property
    def live(self) -> bool:
        """Whether it serves sessions (ready or draining)."""
        return self.state in (VersionState.READY, VersionState.DRAINING)

    @property
    def served(self) -> Engine:
        """Its engine; only for a live version."""
        assert self.engine is not None, f"{self.name} version {self.number} is {self.state.value}"
        return self.engine


@dataclass
class _Model:
    """A model's versions by number, and its labels (label -> version number)."""

    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    # Its one version, while it has had no other (the one-model server, always): every chunk runs there, with
    # no pin to keep or look up.
    sole: Version | None = None

    def live(self) -> list[Version]:
        """Its live versions, newest first."""
        return sorted((v for v in self.versions.values() if v.live), key=lambda v: -v.number)

    def describe(self) -> str:
        numbers = [str(v.number) for v in self.live()] or ["none ready"]
        return "version " + ", ".join(reversed(numbers))


class Models:
    """Every model and version a server holds, and the routing of chunks to them."""

    def __init__(
        self,
        pins_max: int,
        on_state: Callable[[Version], None] = lambda version: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models: dict[str, _Model] = {}
        self._on_state = on_state  # told every version's every change of state (metrics publish it)
        self._bound = (0, 0)  # the largest output size and chunk of any live version
        # (model, session's store key) -> the version it runs on (pinned at its start). A retired version's
        # pins stay (marked by its state) so that a chunk of a session the retirement ended is told so.
        self._pins: OrderedDict[tuple[str, str], Version] = OrderedDict()
        self._pins_max = pins_max
        self._clock = clock

    # The versions' lives

    def loading(self, name: str, number: int) -> Version:
        """Record a version whose weights are being loaded."""
        version = Version(name, number)
        self._models.setdefault(name, _Model(name)).versions[number] = version
        self._rebound()
        self._on_state(version)
        return version

    def ready(self, version: Version, engine: Engine, release: Callable[[], Awaitable[None]]) -> None:
        """A loaded version takes sessions from now on."""
        version.engine, version.release = engine, release
        version.fingerprint = engine.model.spec.fingerprint
        version.state = VersionState.READY
        engine.on_end(lambda ended: self._ended(version, ended))
        self._rebound()
        self._on_state(version)

    def failed(self, version: Version, message: str) -> None:
        """A version did not load, for `message`."""
        version.state, version.message = VersionState.FAILED, message
        self._on_state(version)

    def forget(self, version: Version) -> None:
        """Drop a version that is not live (failed, or retired) from the model's list."""
        model = self._models.get(version.name)
        if model is not None and not version.live and model.versions.get(version.number) is version:
            del model.versions[version.number]
            self._rebound()

    def set_labels(self, name: str, labels: Mapping[str, int]) -> None:
        """Point the model's labels at versions; a label moves only to a ready version (until it is, the label
        stays where it was)."""
        model = self._models.setdefault(name, _Model(name))
        for label, number in labels.items():
            target = model.versions.get(number)
            if target is not None and target.state is VersionState.READY:
                model.labels[label] = number
        for label in set(model.labels) - set(labels):
            del model.labels[label]

    def drain(self, version: Version) -> None:
        """Take no new sessions on `version`; its live ones go on until they end or it is retired."""
        if version.state is not VersionState.READY:
            return
        version.state, version.draining_since = VersionState.DRAINING, self._clock()
        version.served.refuse_new(VersionUnavailableError(version.name, version.number, "draining"))
        self._on_state(version)
        logger.info("model %s version %d draining", version.name, version.number)

    async def retire_drained(self, deadline_s: float, grace_s: float) -> None:
        """Retire the draining versions with no session left (counted in the store, which may be shared),
        or draining for `deadline_s` or more."""
        for version in self.versions():
            since = version.draining_since
            if version.state is not VersionState.DRAINING or since is None:
                continue
            left = await version.served.count_live()
            if left == 0 or self._clock() - since >= deadline_s:
                await self._retire(version, left, grace_s)

    async def _retire(self, version: Version, left: int, grace_s: float) -> None:
        """Unload a draining version: the `left` sessions end (model_retired), then what it held is freed."""
        engine = version.served
        await engine.retire(grace_s, end_left=left > 0)
        if version.release is not None:
            await version.release()
        version.state, version.engine, version.release = VersionState.RETIRED, None, None
        self._rebound()
        self._on_state(version)
        logger.info("model %s version %d retired (%d sessions ended)", version.name, version.number, left)

    async def close(self, grace_s: float) -> None:
        """The server stops: every live version's engine closes (sessions end as shutdown), then frees."""
        for version in self.versions():
            if version.live:
                await version.served.close(grace_s)
        for version in self.versions():
            if version.release is not None:
                await version.release()
                version.release = None

    # What is served

    def versions(self) -> list[Version]:
        """Every version of every model, by name then number. Safe to call from another thread (a scrape of
        the metrics): each dict is copied in one step, never iterated while the loop may change it."""
        found: list[Version] = []
        for _, model in sorted(self._models.items()):
            found += [version for _, version in sorted(model.versions.items())]
        return found

    def labels_of(self, version: Version) -> list[str]:
        """The labels that point at `version`."""
        labels = self._models[version.name].labels
        return sorted(label for label, number in labels.items() if number == version.number)

    @property
    def accepting(self) -> bool:
        """Whether chunks are taken: some version is live and its engine open."""
        return any(v.live and v.served.accepting for v in self.versions())

    def live_sessions(self) -> int:
        """Sessions live on every version (the server's occupancy, bounded by its capacity)."""
        return sum(v.served.live_sessions for v in self.versions() if v.live)

    def held_bytes(self) -> dict[str, int]:
        """Bytes held for sessions of every live version, by kind."""
        total: dict[str, int] = {}
        for version in self.versions():
            if version.live:
                for kind, count in version.served.held_bytes().items():
                    total[kind] = total.get(kind, 0) + count
        return total

    @property
    def output_bound(self) -> tuple[int, int]:
        """The largest output size and longest chunk of any live version: the room a request may need."""
        return self._bound

    def state_bytes(self) -> int:
        """Bytes of recurrent state of every live session."""
        return sum(v.served.live_sessions * _state_bytes(v.served.model) for v in self.versions() if v.live)

    def resolve(self, name: str, version: str = "") -> Version:
        """The version a new session of `name` begins on: `version` as a number or a label, else the newest
        ready one. `ModelNotServedError`, `ModelNotNamedError`; `VersionUnavailableError` when the version
        named takes no new sessions."""
        found = self.describe(name, version)
        if found.state is not VersionState.READY:
            raise VersionUnavailableError(found.name, found.number, found.state.value)
        return found

    def describe(self, name: str, version: str = "") -> Version:
        """The live version `name`/`version` names (a number or a label; empty: the newest ready one),
        draining ones included. `ModelNotServedError` when there is none, `ModelNotNamedError`."""
        model = self._model(name, version)
        if not version:
            ready = [v for v in model.live() if v.state is VersionState.READY]
            if ready:
                return ready[0]
        else:
            found = model.versions.get(model.labels.get(version, _number(version) or 0))
            if found is not None and found.live:
                return found
        raise ModelNotServedError(model.name, version, self._served())

    # Routing

    async def route(self, name: str, version: str, namespace: str, session_id: str, start: bool) -> Version:
        """The version a chunk runs on: a start's resolved version, else the one its session is pinned to.

        Pins outlive their sessions (until the bounded cache drops them), so that the retry of a session's
        last chunk reaches the version that kept its answer. A continuing session the pins do not know (a
        model's sole version pins none; another replica may have started it) is looked for in the model's
        live versions, newest first."""
        model = self._model(name, version)
        if model.sole is not None and not version:
            return model.sole
        key = session_key(namespace, session_id)
        pinned = self._pinned((model.name, key)) if session_id else None
        if start:
            chosen = self.resolve(model.name, version)
            if pinned is not None and await _live_elsewhere(pinned, chosen, session_id, namespace):
                raise SessionPinnedError(session_id, pinned.name, pinned.number)
            return chosen
        if pinned is not None:
            return self._pinned_route(pinned, version, session_id)
        for candidate in model.live():
            if await candidate.served.holds(session_id, namespace):
                self.pin(candidate, key)
                return self._pinned_route(candidate, version, session_id)
        if version:  # its engine answers: the replay of the session's last chunk, or NOT_FOUND
            return self.describe(model.name, version)
        raise SessionNotServedError(session_id, model.name, model.describe())

    def pin(self, version: Version, key: str) -> None:
        """Remember that the session of store key `key` runs on `version` (unless it is its model's sole)."""
        if self._models[version.name].sole is version:
            return
        self._remember((version.name, key), version)

    async def apply(
        self,
        chosen: Version,
        chunk: Chunk,
        watcher: Watcher | None = None,
        backlog: Backlog | None = None,
    ) -> ChunkResult:
        """Apply a routed chunk on its version (`Engine.step`); a session it starts is pinned there."""
        result = await chosen.served.step(chunk, watcher, backlog)
        if chunk.start and not result.ended:
            self.pin(chosen, session_key(chunk.namespace, result.session_id))
        return result

    async def route_frame(self, name: str, version: str, frame: Frame) -> Version:
        """The version a frame runs on (every session of a frame runs on one): named, else its first
        session's (`route`)."""
        first_id = frame.session_ids[0] if frame.session_ids else ""
        first_start = bool(frame.start and frame.start[0])
        return await self.route(name, version, frame.namespace, first_id, first_start)

    async def apply_frame(
        self, chosen: Version, frame: Frame, watcher: Watcher | None = None
    ) -> FrameOutcome:
        """Apply a routed frame on its version (`Engine.step_frame`); the sessions it starts are pinned
        there."""
        outcome = await chosen.served.step_frame(frame, watcher)
        if any(frame.start):
            for row, session_id in enumerate(outcome.session_ids):
                if frame.start[row] and row not in outcome.errors:
                    self.pin(chosen, session_key(frame.namespace, session_id))
        return outcome

    async def end_session(self, name: str, version: str, session_id: str, namespace: str = "") -> int:
        """End a live session (`Engine.end_session`); its step count."""
        chosen = await self.route(name, version, namespace, session_id, start=False)
        return await chosen.served.end_session(session_id, namespace)

    async def snapshot(
        self, name: str, version: str, session_id: str, namespace: str = ""
    ) -> tuple[bytes, int]:
        """A session's snapshot and step count (`Engine.snapshot`)."""
        chosen = await self.route(name, version, namespace, session_id, start=False)
        return await chosen.served.snapshot(session_id, namespace)

    def unwatch(self, session_ids: Iterable[str], watcher: Watcher, namespace: str = "") -> None:
        """Stop telling `watcher` about these sessions, on every version."""
        ids = list(session_ids)
        for version in self.versions():
            if version.live:
                version.served.unwatch(ids, watcher, namespace)

    def _remember(self, pin: tuple[str, str], version: Version) -> None:
        self._pins[pin] = version
        self._pins.move_to_end(pin)
        if len(self._pins) > self._pins_max:
            self._pins.popitem(last=False)

    def _ended(self, version: Version, ended: SessionEnd) -> None:
        """A session of `version` ended: one its retirement ended stays pinned there (whatever version it
        began on), so that a later chunk of it is told why it is gone."""
        if ended.reason is EndReason.MODEL_RETIRED:
            self._remember((version.name, ended.session_id), version)  # SessionEnd names its store key

    def _pinned(self, key: tuple[str, str]) -> Version | None:
        pinned = self._pins.get(key)
        if pinned is not None:
            self._pins.move_to_end(key)
        return pinned

    def _pinned_route(self, pinned: Version, version: str, session_id: str) -> Version:
        if not pinned.live:
            raise VersionRetiredError(session_id, pinned.name, pinned.number)
        if version and self._names_other(pinned, version):
            raise SessionPinnedError(session_id, pinned.name, pinned.number)
        return pinned

    def _names_other(self, pinned: Version, version: str) -> bool:
        """Whether `version` (a number or label) names a version other than `pinned`."""
        return self._models[pinned.name].labels.get(version, _number(version)) != pinned.number

    def _rebound(self) -> None:
        for model in self._models.values():
            only = next(iter(model.versions.values())) if len(model.versions) == 1 else None
            model.sole = only if only is not None and only.live else None
        models = [v.served.model for v in self.versions() if v.live]
        self._bound = (
            max((m.spec.output_size for m in models), default=0),
            max((m.max_chunk_steps for m in models), default=0),
        )

    def _model(self, name: str, version: str) -> _Model:
        if not name:
            if len(self._models) != 1:
                raise ModelNotNamedError(self._served())
            return next(iter(self._models.values()))
        model = self._models.get(name)
        if model is None:
            raise ModelNotServedError(name, version, self._served())
        return model

    def _served(self) -> str:
        return "; ".join(f"{name!r} {model.describe()}" for name, model in sorted(self._models.items()))


async def _live_elsewhere(pinned: Version, chosen: Version, session_id: str, namespace: str) -> bool:
    """Whether the session is live on `pinned`, a version other than the `chosen` one."""
    return pinned is not chosen and pinned.live and await pinned.served.holds(session_id, namespace)


def _state_bytes(model: ServedModel) -> int:
    return math.prod(model.state_shape) * 4  # float32


def _number(version: str) -> int | None:
    """A version number written as text, or None (a label, or nothing)."""
    return int(version) if version.isdigit() else None
