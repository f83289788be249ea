"""Merge the metric families of several gateway processes into the families of one gateway (``--workers N``).

Pure: families in, families out; fetching them is the admin port's job (``gateway/admin.py``). Each worker records
into its own registry, so a scrape that stands for the whole gateway needs the workers' numbers combined, series by
series (same sample name, same labels). Events (counters, histogram buckets, counts and sums) add up; a gauge is a
reading of one process and needs a rule of its own (``GAUGE_RULES``); ``_created`` takes the earliest; an exemplar
keeps the newest. The first family seen under a name fixes its type, help and unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Exemplar, Sample, Timestamp

__all__ = ["GAUGE_RULES", "Combine", "MergeResult", "combine_rule", "merge_families", "parse_openmetrics"]

Combine = Callable[[float, float], float]
Labels = tuple[tuple[str, str], ...]


def _add(a: float, b: float) -> float:
    return a + b


def _max(a: float, b: float) -> float:
    return max(a, b)


def _min(a: float, b: float) -> float:
    return min(a, b)


# Breaker states as telemetry/metrics.py exposes them (0 closed, 1 tripped, 2 probing), ranked by how much traffic
# they refuse: tripped refuses everything, probing lets trial requests through. A plain max would rank probing
# above tripped. A value outside the three is ranked worst: it is news, not something to hide.
_BREAKER_SEVERITY: Mapping[float, int] = {0.0: 0, 2.0: 1, 1.0: 2}


def _worst_breaker(a: float, b: float) -> float:
    return a if _BREAKER_SEVERITY.get(a, 3) >= _BREAKER_SEVERITY.get(b, 3) else b


# How one gauge combines across workers, by family name: the one table to edit when a gauge is added to
# telemetry/metrics.py. A gauge that counts something each worker owns sums; a gauge that reads state every worker
# keeps its own copy of (config, breakers, health) must not sum, or the group would report it N times over.
GAUGE_RULES: Mapping[str, Combine] = {
    # Each worker handles its own requests: the gateway's in-flight count is their sum.
    "http_server_active_requests": _add,
    # Every worker loads the same file; they differ only for the moment of a reload, and the max is the newest.
    "meshgate_config_version": _max,
    # Each worker keeps its own breaker per endpoint: report the worst any worker has (tripped > probing > closed).
    "meshgate_circuit_breaker_state": _worst_breaker,
    # Each worker health-checks the same endpoints on its own: per state, the most endpoints any one worker counts.
    # (The states of a series may then add up to more than the cluster has, for the moment the workers disagree.)
    "meshgate_upstream_endpoints": _max,
}
# A gauge not in the table: the max never counts shared state N times, which a sum of an unknown gauge could.
_DEFAULT_GAUGE_RULE: Combine = _max

# Sample suffixes that count events, per family type: each worker counted its own events, so they add up.
_SUMMED_SUFFIXES: Mapping[str, frozenset[str]] = {
    "counter": frozenset({"_total"}),
    "histogram": frozenset({"_bucket", "_count", "_sum"}),
    "gaugehistogram": frozenset({"_bucket", "_gcount", "_gsum"}),
    "summary": frozenset({"_count", "_sum"}),
}
_BUCKETED = frozenset({"histogram", "gaugehistogram"})


def combine_rule(family: Metric, sample_name: str) -> Combine:
    """How the samples named ``sample_name`` of ``family`` from two workers combine into one value."""
    suffix = sample_name[len(family.name) :]
    if suffix == "_created":  # the group's series began when its first worker's did
        return _min
    if suffix in _SUMMED_SUFFIXES.get(family.type, frozenset()):
        return _add
    if family.type == "gauge":
        return GAUGE_RULES.get(family.name, _DEFAULT_GAUGE_RULE)
    # Summary quantiles, info, stateset, unknown: meshgate exports none of them, and no sum of them means anything.
    return _max


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The merged families, in first-seen order, and the names of families dropped from a source for a type clash."""

    families: tuple[Metric, ...]
    conflicts: tuple[str, ...] = ()


def merge_families(sources: Iterable[Iterable[Metric]]) -> MergeResult:
    """Combine each source's families (one source per worker) into one list of families.

    A family whose type differs from the one first seen under its name is left out of the result for that source
    (and named in ``conflicts``): adding a gauge into a counter would produce a number that is neither.
    """
    merging: dict[str, _Merging] = {}
    conflicts: list[str] = []
    for source in sources:
        for family in source:
            current = merging.get(family.name)
            if current is None:
                current = merging[family.name] = _Merging(family)
            elif current.template.type != family.type:
                conflicts.append(family.name)
                continue
            current.add(family.samples)
    return MergeResult(tuple(m.build() for m in merging.values()), tuple(conflicts))


def parse_openmetrics(text: str) -> list[Metric]:
    """The families of an OpenMetrics exposition (exemplars included); ``ValueError`` when it is not one."""
    families: Iterable[Metric] = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return list(families)  # the parser is lazy: parse it all here, so errors surface here


@dataclass(slots=True)
class _Merging:
    """One family being merged: its samples grouped by metric point (the labels bar ``le``/``quantile``)."""

    template: Metric
    points: dict[Labels, dict[tuple[str, Labels], Sample]] = field(default_factory=dict)

    def add(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            series = self.points.setdefault(_point(self.template, sample), {})
            key = (sample.name, _label_key(sample.labels))
            previous = series.get(key)
            series[key] = sample if previous is None else _combine(previous, sample, self.template)

    def build(self) -> Metric:
        t = self.template
        metric = Metric(t.name, t.documentation, t.type, t.unit)
        bucket = t.name + "_bucket" if t.type in _BUCKETED else None
        for series in self.points.values():
            # OpenMetrics wants a point's samples together and its buckets in ascending ``le`` (its parser rejects
            # anything else); sorted() is stable, so the rest keep the order the first worker gave them.
            metric.samples.extend(
                sorted(series.values(), key=lambda s: (0, float(s.labels["le"])) if s.name == bucket else (1, 0.0))
            )
        return metric


def _point(family: Metric, sample: Sample) -> Labels:
    """The labels that identify the sample's metric point: a histogram's buckets and a summary's quantiles belong
    to the point of their other labels."""
    if family.type in _BUCKETED and sample.name == family.name + "_bucket":
        return _label_key(sample.labels, "le")
    if family.type == "summary" and sample.name == family.name:
        return _label_key(sample.labels, "quantile")
    return _label_key(sample.labels)


def _label_key(labels: Mapping[str, str], without: str = "") -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if k != without))


def _combine(previous: Sample, sample: Sample, family: Metric) -> Sample:
    # Native histograms are not merged: OpenMetrics 1.0 cannot carry them and meshgate declares none.
    return Sample(
        previous.name,
        previous.labels,
        combine_rule(family, previous.name)(previous.value, sample.value),
        _newest(previous.timestamp, sample.timestamp),
        _newest_exemplar(previous.exemplar, sample.exemplar),
        previous.native_histogram,
    )


def _seconds(timestamp: float | Timestamp | None) -> float:
    return float("-inf") if timestamp is None else float(timestamp)


def _newest(a: float | Timestamp | None, b: float | Timestamp | None) -> float | Timestamp | None:
    return b if _seconds(b) > _seconds(a) else a


def _newest_exemplar(a: Exemplar | None, b: Exemplar | None) -> Exemplar | None:
    """The exemplar recorded last: the trace a dashboard links to should be the freshest one."""
    if a is None or b is None:
        return a if b is None else b
    return b if _seconds(b.timestamp) > _seconds(a.timestamp) else a
