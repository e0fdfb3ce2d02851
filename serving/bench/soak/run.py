"""`run_soak`: the server (its own process, or a target), the sessions' slots on one asyncio loop in this
process, and the server's resident memory read every few seconds meanwhile."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serving.bench.grid import require_model
from serving.bench.host import HostSpec, hosting
from serving.bench.soak.options import SoakOptions
from serving.bench.soak.tally import Memory, Tally
from serving.bench.soak.traffic import CLIENT_OPTIONS, Traffic
from serving.client import AsyncConveyorClient, ModelInfo
from serving.client.scrape import scrape

_READY_TIMEOUT_S = 60.0
_PROGRESS_S = 60.0  # a progress line this often
_EXPIRY_SHARE = 0.25  # sessions are left to expire only if the TTL is at most this share of the run


@dataclass(frozen=True)
class SoakResult:
    """What a soak did and saw."""

    options: SoakOptions
    info: ModelInfo
    seconds: float  # of traffic
    tally: Tally
    memory: Memory

    @property
    def memory_flat(self) -> bool:
        """Whether resident memory stayed within the drift allowed after the warm-up."""
        return self.memory.drift_pct <= self.options.max_drift_pct

    @property
    def passed(self) -> bool:
        """No unexpected answer, no failed check, memory flat."""
        return self.tally.unexpected == 0 and self.memory_flat

    def verdict(self) -> str:
        """One line: passed or not, and why."""
        drift, limit = self.memory.drift_pct, self.options.max_drift_pct
        return (
            f"{'PASSED' if self.passed else 'FAILED'}: {self.tally.unexpected} unexpected; resident memory "
            f"{drift:+.1f}% after the warm-up ({'within' if self.memory_flat else 'over'} {limit:g}%)"
        )


def run_soak(options: SoakOptions, progress: Callable[[str], None] = lambda line: None) -> SoakResult:
    """Soak a server for `options.duration_s`; `progress` gets a line about once a minute."""
    spec = None
    if options.model_dir is not None:
        require_model(options.model_dir)
        spec = HostSpec("server", options.model_dir, {"idle_ttl_s": options.idle_ttl_s})
    with hosting(spec, options.target) as host:
        read_rss = host.rss_bytes if spec is not None else _scraped_rss(options.metrics_url)
        return asyncio.run(_soak(host.target, read_rss, options, progress))


def _scraped_rss(url: str | None) -> Callable[[], int]:
    assert url is not None  # SoakOptions asks a target for its /metrics
    return lambda: int(scrape(url, timeout_s=10).total("process_resident_memory_bytes"))


async def _soak(
    target: str, read_rss: Callable[[], int], options: SoakOptions, progress: Callable[[str], None]
) -> SoakResult:
    links = [AsyncConveyorClient(target, CLIENT_OPTIONS) for _ in range(options.connections)]
    try:
        await links[0].wait_for_ready(_READY_TIMEOUT_S)
        info = await links[0].model_info()
        expiry = info.idle_ttl_s <= _EXPIRY_SHARE * options.duration_s
        samples = [(0.0, await asyncio.to_thread(read_rss))]  # before any traffic
        began = time.monotonic()
        tally = Tally(lambda: time.monotonic() - began, options.sample_s)
        traffic = Traffic(target, info, tally, options.think_ms / 1000, expiry)
        until = options.duration_s
        tasks = [asyncio.create_task(_sample(read_rss, samples, tally, options.sample_s, until, progress))]
        for slot in range(options.sessions):
            rng = np.random.default_rng((options.seed, slot))
            tasks.append(asyncio.create_task(_slot(traffic, links[slot % len(links)], rng, tally, until)))
        await _run_for(tasks, until)
        seconds = tally.clock()
        samples.append((seconds, await asyncio.to_thread(read_rss)))
    finally:
        await asyncio.gather(*(link.close() for link in links))
    return SoakResult(options, info, seconds, tally, Memory(tuple(samples), options.warmup))


async def _run_for(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Let the tasks run for `seconds`, then cancel them; what they had in flight is not counted. A task
    ends early only by failing (a bug in the soak, not an answer of the server's): its error is raised.

    Each task also stops by itself at the deadline: on Python 3.11 `asyncio.wait_for` (which the client's
    Stream uses) can swallow a cancellation that arrives as its answer does, and a task that missed its
    cancellation would otherwise go on forever."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


async def _slot(
    traffic: Traffic, shared: AsyncConveyorClient, rng: np.random.Generator, tally: Tally, until: float
) -> None:
    while tally.clock() < until:
        await traffic.session(shared, rng)


async def _sample(
    read_rss: Callable[[], int],
    samples: list[tuple[float, int]],
    tally: Tally,
    every_s: float,
    until: float,
    progress: Callable[[str], None],
) -> None:
    """Read the server's resident memory every `every_s`, on the beat of the soak's clock, until `until` (the
    last sample, at the deadline, is taken by the caller once the traffic has stopped)."""
    next_progress = _PROGRESS_S
    for beat in itertools.count(1):
        if beat * every_s >= until:
            return
        await asyncio.sleep(max(0.0, beat * every_s - tally.clock()))
        samples.append((tally.clock(), await asyncio.to_thread(read_rss)))
        if samples[-1][0] >= next_progress:
            next_progress += _PROGRESS_S
            progress(_progress_line(*samples[-1], tally))


def _progress_line(seconds: float, rss: int, tally: Tally) -> str:
    chunks = tally.kinds["via Stream"] + tally.kinds["via Frames"] + tally.kinds["via Step"]
    return (
        f"{seconds / 60:5.1f} min  {tally.kinds['opened'] + tally.kinds['opened, id issued']:7d} sessions  "
        f"{chunks:8d} chunk requests  {tally.unexpected} unexpected  server RSS {rss / 1e6:.1f} MB"
    )
