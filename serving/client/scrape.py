"""A server's /metrics, read and parsed once: the Prometheus text exposition as samples to add up.

The one parser of /metrics for everything that reads it (the demo, the benchmark, the tests).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    """One scrape: the exposition text and its samples."""

    text: str
    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """The samples of an exposition text."""
        return cls(text, tuple(s for family in text_string_to_metric_families(text) for s in family.samples))

    def total(self, name: str) -> float:
        """The sum of sample `name` over all its label sets (0 when absent)."""
        return sum(sample.value for sample in self.samples if sample.name == name)

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """A histogram's (upper bound, cumulative count), summed over its label sets, sorted, +Inf last."""
        cumulative: dict[float, float] = {}
        for sample in self.samples:
            if sample.name == f"{histogram}_bucket":
                bound = float(sample.labels["le"])
                cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
        return sorted(cumulative.items())

    def quantile(self, histogram: str, q: float) -> float:
        """The `q` quantile of a histogram, as Prometheus' histogram_quantile estimates it."""
        return histogram_quantile(self.buckets(histogram), q)

    def by_key(self) -> dict[str, float]:
        """Every sample as `name{label="value",...}` (labels sorted) -> value."""
        keyed = {}
        for sample in self.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            keyed[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return keyed


def scrape(url: str, *, timeout_s: float = 5.0) -> Scrape:
    """GET `url` (a server's http://host:port/metrics) and parse it."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return Scrape.parse(response.read().decode())


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: `buckets` are (upper bound, cumulative count), sorted, +Inf last;
    linear interpolation within the bucket that holds the rank; NaN without observations."""
    total = buckets[-1][1] if buckets else 0.0
    if total == 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower  # no upper bound to interpolate to: the largest finite bound, as Prometheus does
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = upper, cumulative
    return lower
