"""What a soak counts as it runs (traffic by kind, answers by code and whether that code was expected, the
checks of replays and outputs), and its figures of the server's resident memory."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

OK = "OK"
_MAX_FAILURES_KEPT = 20  # described in the report; the rest are only counted


@dataclass
class Tally:
    """Counts of one soak, kept as the traffic runs; `clock` gives the seconds since the soak began."""

    clock: Callable[[], float]
    bucket_s: float  # the timeline's resolution
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    answers: collections.Counter[tuple[str, str, bool]] = field(default_factory=collections.Counter)
    checks: collections.Counter[tuple[str, bool]] = field(default_factory=collections.Counter)
    timeline: collections.defaultdict[int, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: list[str] = field(default_factory=list)
    max_diff: float = 0.0  # the largest scaled difference of streamed outputs from a one-chunk run

    def count(self, kind: str, n: int = 1) -> None:
        """Traffic of `kind` happened (`n` times)."""
        self.kinds[kind] += n

    def answer(self, kind: str, code: str, expected: str, message: str) -> None:
        """A request of `kind` was answered with `code` (OK or a status name) where `expected` was due."""
        is_expected = code == expected
        self.answers[(kind, code, is_expected)] += 1
        outcome = "unexpected" if not is_expected else "ok" if code == OK else "expected error"
        self.timeline[int(self.clock() / self.bucket_s)][outcome] += 1
        if not is_expected:
            self._failed(f"{kind}: {code} where {expected} was due: {message}")

    def check(self, name: str, passed: bool, detail: str) -> None:
        """A check of an answer's content (a replay, a session's outputs) passed or failed."""
        self.checks[(name, passed)] += 1
        if not passed:
            self.timeline[int(self.clock() / self.bucket_s)]["unexpected"] += 1
            self._failed(f"{name}: {detail}")

    @property
    def unexpected(self) -> int:
        """Answers with a code other than the one due, plus failed checks."""
        wrong_codes = sum(n for (_, _, expected), n in self.answers.items() if not expected)
        return wrong_codes + sum(n for (_, passed), n in self.checks.items() if not passed)

    def by_code(self) -> dict[str, dict[str, int]]:
        """Answers by code: {"OK": {"expected": n, "unexpected": m}, ...}, most frequent first."""
        codes: dict[str, dict[str, int]] = {}
        for (_, code, expected), n in self.answers.most_common():
            entry = codes.setdefault(code, {"expected": 0, "unexpected": 0})
            entry["expected" if expected else "unexpected"] += n
        return codes

    def by_kind(self, prefix: str) -> dict[str, dict[str, int]]:
        """Answers to the requests whose kind starts with `prefix`, by kind (prefix removed) then code."""
        kinds: dict[str, dict[str, int]] = {}
        for (kind, code, _), n in sorted(self.answers.items()):
            if kind.startswith(prefix):
                kinds.setdefault(kind.removeprefix(prefix), {})[code] = n
        return kinds

    def series(self, seconds: float) -> list[dict[str, float]]:
        """Answers per second over the first `seconds` of the run, one point per whole bucket: ok, expected
        errors, unexpected (the answers to requests still in flight at the end are left out)."""
        return [
            {"t_s": (i + 0.5) * self.bucket_s}
            | {k: self.timeline[i][k] / self.bucket_s for k in ("ok", "expected error", "unexpected")}
            for i in range(int(seconds / self.bucket_s + 1e-9))
        ]

    def _failed(self, description: str) -> None:
        if len(self.failures) < _MAX_FAILURES_KEPT:
            self.failures.append(f"{self.clock():.1f} s {description}")


@dataclass(frozen=True)
class Memory:
    """The server's resident memory over the run, and what it did after the warm-up."""

    samples: tuple[tuple[float, int], ...]  # (seconds since the soak began, bytes), in time order
    warmup_s: float

    @property
    def at_start(self) -> int:
        """Before any traffic."""
        return self.samples[0][1]

    @property
    def at_warmup(self) -> int:
        """The first sample at or after the warm-up's end: the level the rest is judged against."""
        return self._after()[0][1]

    @property
    def max_after(self) -> int:
        """The most, from the warm-up's end on."""
        return max(rss for _, rss in self._after())

    @property
    def last(self) -> int:
        """At the end of the run."""
        return self.samples[-1][1]

    @property
    def drift_pct(self) -> float:
        """How far above its warm-up level memory went afterwards (its maximum), in percent."""
        return 100.0 * (self.max_after - self.at_warmup) / self.at_warmup

    @property
    def slope_mb_per_min(self) -> float:
        """The trend after the warm-up (a least-squares line), in MB per minute: a leak shows as a slope."""
        after = self._after()
        if len(after) < 2:
            return 0.0
        t, rss = np.array(after, dtype=np.float64).T
        return float(np.polyfit(t / 60.0, rss / 1e6, 1)[0])

    def _after(self) -> Sequence[tuple[float, int]]:
        return [sample for sample in self.samples if sample[0] >= self.warmup_s] or self.samples[-1:]
