"""Model versions brought into service, and the model repository that says which: `DIR/<name>/<version>/`.

`serve_version` gives one loaded version what serving it takes (a store, a batch queue, an engine, its
metrics). `Repository` watches a directory of models: a version directory that appears is loaded while the
server serves; once it is ready the versions it replaces drain; a drained version is retired.

Why a watched directory rather than load and unload RPCs: the repository is where a deployment already puts
its artifacts (a volume the trainer writes, a synced bucket), so a rollout is a copy, the same on every
replica, with no admin credential to guard and no state of the server's own to lose on restart: a replica
that starts later loads what the directory holds. `DIR/<name>/versions.json` may say how many of the newest
versions take new sessions (`{"latest": 1}`, the default) and point labels at versions
(`{"labels": {"stable": 3}}`); a labelled version is served too. A version's directory is read once it holds
both model.onnx and model.json; write them, then rename the directory into place, so no half-written
artifact is read (one that fails to load is tried again when its files change).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelcard import CARD_FILE, ONNX_FILE
from serving.domain.batcher import Batcher
from serving.domain.chunks import ServedModel
from serving.domain.engine import Engine
from serving.domain.errors import ModelLoadError
from serving.domain.models import Models, Version, VersionState
from serving.domain.runner import StepRunner
from serving.domain.sessions.lifecycle import SessionLimits, Sessions
from serving.server.config import ServerConfig
from serving.server.metrics import ConveyorMetrics
from serving.server.onnx_runner import OnnxStepRunner
from serving.server.stores import open_store

logger = logging.getLogger(__name__)

POLICY_FILE = "versions.json"


@dataclass(frozen=True)
class Serving:
    """What every version is served with: the configuration, metrics, tenants' quotas, and the clock of
    session expiry (None: the store's)."""

    config: ServerConfig
    metrics: ConveyorMetrics
    quotas: dict[str, int] | None
    clock: Callable[[], float] | None


async def serve_version(models: Models, version: Version, runner: StepRunner, serving: Serving) -> None:
    """Give a loaded version its store, batch queue and engine, and make it ready. `StoreUnavailableError`
    when its store cannot be reached."""
    config, metrics = serving.config, serving.metrics
    model = ServedModel(runner.spec, config.max_chunk_steps, config.idle_ttl_s, config.replay_max_bytes)
    labels = version.labels
    repository = config.models_dir is not None
    opened = await open_store(
        config, model, metrics, f"{version.name}/{version.number}" if repository else ""
    )
    limits = SessionLimits(
        idle_ttl_s=config.idle_ttl_s,
        lifetime_s=config.session_lifetime_s,
        max_sessions=config.max_sessions,
        evict_lru=config.evict_lru_at_capacity,
        replay_window_s=config.replay_window_s,
    )
    sessions = Sessions(
        opened.store, limits, clock=serving.clock or opened.clock, occupancy=models.live_sessions
    )
    batcher = Batcher(
        runner,
        max_batch_size=config.max_batch_size,
        max_delay_ms=config.max_delay_ms,
        inline_max_ms=config.inline_batch_max_ms,
        metrics=metrics,
    )
    engine = Engine(model, sessions, batcher, metrics.for_version(labels), serving.quotas)
    metrics.track_sessions(labels, sessions.__len__)
    sessions.start_sweeper(config.sweep_interval_s)

    async def release() -> None:  # after the engine closed or retired (its sweeper stopped)
        batcher.close()
        await opened.close()

    models.ready(version, engine, release)


def load_runner(config: ServerConfig, directory: Path) -> OnnxStepRunner:
    """Load and warm up one artifact directory's model (`ModelLoadError` when it cannot be served)."""
    return OnnxStepRunner.load(
        directory, intra_op_threads=config.ort_intra_op_threads, parallel_calls=config.ort_parallel_calls
    )


@dataclass(frozen=True)
class _Policy:
    """A model's versions.json: how many of the newest versions are served, and its labels."""

    latest: int = 1
    labels: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> _Policy:
        path = model_dir / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            latest = int(raw.get("latest", 1))
            labels = {str(label): int(number) for label, number in raw.get("labels", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            logger.error("%s is not valid (%s): using the default policy (latest 1, no labels)", path, exc)
            return cls()
        return cls(max(latest, 1), labels)


class Repository:
    """A watched model repository, loading its versions into `models` and draining the replaced ones."""

    def __init__(self, root: Path, models: Models, serving: Serving) -> None:
        self._root = root
        self._models = models
        self._serving = serving
        self._tried: dict[tuple[str, int], float] = {}  # version -> its files' mtime when last loaded
        self._watcher: asyncio.Task[None] | None = None

    async def scan(self) -> None:
        """Load the versions that appeared (or changed, after failing), point the labels, drain what is no
        longer served and retire what has drained."""
        if not self._root.is_dir():
            raise ModelLoadError(f"the model repository {self._root} is not a directory")
        for model_dir in sorted(p for p in self._root.iterdir() if p.is_dir()):
            await self._scan_model(model_dir)
        config = self._serving.config
        await self._models.retire_drained(config.drain_deadline_s, config.grace_s)

    def start(self) -> None:
        """Scan every `repository_poll_s` from now on."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="conveyor-repository")

    def stop(self) -> None:
        """Stop watching."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def _scan_model(self, model_dir: Path) -> None:
        name = model_dir.name
        present = _version_dirs(model_dir)
        for number, directory in present:
            await self._load_if_new(name, number, directory)
        policy = _Policy.read(model_dir)
        self._models.set_labels(name, policy.labels)
        self._drain_replaced(name, policy, {number for number, _ in present})

    async def _load_if_new(self, name: str, number: int, directory: Path) -> None:
        key = (name, number)
        known = [v for v in self._models.versions() if (v.name, v.number) == key]
        if known and known[0].state is not VersionState.FAILED:
            return
        mtime = _mtime(directory)  # a version that failed is tried again once its files change
        if self._tried.get(key) == mtime:
            return
        if known:
            self._models.forget(known[0])
        self._tried[key] = mtime
        version = self._models.loading(name, number)
        try:
            runner = await asyncio.to_thread(load_runner, self._serving.config, directory)
            await serve_version(self._models, version, runner, self._serving)
        except Exception as exc:  # any failure of one version leaves the others served
            self._models.failed(version, str(exc))
            logger.error("model %s version %d did not load: %s", name, number, exc)
            return
        logger.info("model %s version %d ready (fingerprint %s)", name, number, version.fingerprint[:12])

    def _drain_replaced(self, name: str, policy: _Policy, present: set[int]) -> None:
        """Drain the ready versions the policy no longer serves, once a version it serves is ready (the last
        ready version never drains while its replacement loads, or fails to)."""
        versions = [v for v in self._models.versions() if v.name == name]
        ready = sorted((v.number for v in versions if v.state is VersionState.READY), reverse=True)
        wanted = set(sorted(present, reverse=True)[: policy.latest]) | set(policy.labels.values())
        served = [n for n in ready if n in wanted and n in present]
        if not served:
            return
        for version in versions:
            if version.state is VersionState.READY and version.number not in served:
                self._models.drain(version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._serving.config.repository_poll_s)
            try:
                await self.scan()
            except Exception:  # a failed scan (the directory unmounted a moment) must not stop later ones
                logger.exception("model repository scan failed")


def _version_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """A model's complete version directories (both files written), by number."""
    found = []
    for path in model_dir.iterdir():
        complete = (path / ONNX_FILE).exists() and (path / CARD_FILE).exists()
        if path.is_dir() and path.name.isdigit() and complete:
            found.append((int(path.name), path))
    return sorted(found)


def _mtime(directory: Path) -> float:
    return max(p.stat().st_mtime for p in (directory / ONNX_FILE, directory / CARD_FILE))
