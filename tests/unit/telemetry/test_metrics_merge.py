"""Merging several workers' metric families: events add up, gauges follow their rule, the newest exemplar wins."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.samples import Exemplar, Sample, Timestamp

from telemetry.metrics_merge import GAUGE_RULES, merge_families, parse_openmetrics

# --- helpers ----------------------------------------------------------------------------------------------------

Row = tuple[str, dict[str, str], float]  # sample name, labels, value


def family(name: str, typ: str, *rows: Row, exemplars: dict[int, Exemplar] | None = None) -> Metric:
    """A family with these samples; ``exemplars`` maps a row's position to its exemplar."""
    metric = Metric(name, f"{name} help", typ)
    for position, (sample, labels, value) in enumerate(rows):
        metric.add_sample(sample, labels, value, exemplar=(exemplars or {}).get(position))
    return metric


def histogram(name: str, labels: dict[str, str], buckets: Sequence[tuple[str, float]], total: float) -> Metric:
    """A histogram point: cumulative ``(le, count)`` buckets, then _count and _sum."""
    rows: list[Row] = [(f"{name}_bucket", {**labels, "le": le}, count) for le, count in buckets]
    rows += [(f"{name}_count", labels, buckets[-1][1]), (f"{name}_sum", labels, total)]
    return family(name, "histogram", *rows)


def values(metric: Metric) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in metric.samples}


def merged_one(*sources: list[Metric]) -> Metric:
    result = merge_families(sources)
    [metric] = result.families
    return metric


GET = {"http_route": "api"}


# --- counters and histograms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([1.0], 1.0),
        ([3.0, 4.0], 7.0),
        ([1.0, 2.0, 3.0], 6.0),
        ([0.0, 5.0], 5.0),
    ],
    ids=["one-worker", "two", "three", "one-idle"],
)
def test_counters_sum(workers: list[float], expected: float) -> None:
    sources = [[family("requests", "counter", ("requests_total", GET, v))] for v in workers]
    assert values(merged_one(*sources)) == {("requests_total", (("http_route", "api"),)): expected}


def test_created_takes_the_earliest() -> None:
    a = family("requests", "counter", ("requests_total", GET, 1.0), ("requests_created", GET, 200.0))
    b = family("requests", "counter", ("requests_total", GET, 2.0), ("requests_created", GET, 100.0))
    labels = (("http_route", "api"),)
    assert values(merged_one([a], [b])) == {("requests_total", labels): 3.0, ("requests_created", labels): 100.0}


def test_histogram_buckets_count_and_sum_add_up() -> None:
    a = histogram("d", GET, [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)], 2.5)
    b = histogram("d", GET, [("0.1", 0.0), ("1.0", 2.0), ("+Inf", 2.0)], 1.0)
    merged = merged_one([a], [b])
    labels = (("http_route", "api"),)
    assert values(merged) == {
        ("d_bucket", (("http_route", "api"), ("le", "0.1"))): 1.0,
        ("d_bucket", (("http_route", "api"), ("le", "1.0"))): 5.0,
        ("d_bucket", (("http_route", "api"), ("le", "+Inf"))): 6.0,
        ("d_count", labels): 6.0,
        ("d_sum", labels): 3.5,
    }


def test_disjoint_label_sets_are_united_and_each_point_stays_together() -> None:
    a = histogram("d", {"http_route": "api"}, [("0.1", 1.0), ("+Inf", 1.0)], 0.05)
    b = histogram("d", {"http_route": "web"}, [("0.1", 0.0), ("+Inf", 2.0)], 0.4)
    c = histogram("d", {"http_route": "api"}, [("0.1", 1.0), ("+Inf", 1.0)], 0.05)
    merged = merged_one([a], [b], [c])
    routes = [s.labels["http_route"] for s in merged.samples]
    assert routes == ["api"] * 4 + ["web"] * 4  # contiguous per point: OpenMetrics rejects interleaved points
    assert values(merged)[("d_count", (("http_route", "web"),))] == 2.0
    assert values(merged)[("d_count", (("http_route", "api"),))] == 2.0


def test_a_bucket_only_one_worker_has_is_put_in_le_order() -> None:
    a = histogram("d", GET, [("0.1", 1.0), ("+Inf", 1.0)], 0.05)
    b = histogram("d", GET, [("0.1", 0.0), ("0.5", 1.0), ("+Inf", 1.0)], 0.3)
    merged = merged_one([a], [b])
    assert [s.labels.get("le") for s in merged.samples] == ["0.1", "0.5", "+Inf", None, None]


# --- gauges -----------------------------------------------------------------------------------------------------

CLOSED, TRIPPED, PROBING = 0.0, 1.0, 2.0


@pytest.mark.parametrize(
    ("name", "labels", "workers", "expected"),
    [
        ("http_server_active_requests", {}, [2.0, 3.0], 5.0),
        ("meshgate_config_version", {}, [4.0, 5.0], 5.0),
        ("meshgate_upstream_endpoints", {"upstream": "main", "state": "healthy"}, [2.0, 3.0], 3.0),
        ("meshgate_circuit_breaker_state", {"upstream": "main", "endpoint": "e"}, [CLOSED, PROBING], PROBING),
        ("meshgate_circuit_breaker_state", {"upstream": "main", "endpoint": "e"}, [TRIPPED, PROBING], TRIPPED),
        ("meshgate_circuit_breaker_state", {"upstream": "main", "endpoint": "e"}, [PROBING, TRIPPED], TRIPPED),
        ("meshgate_circuit_breaker_state", {"upstream": "main", "endpoint": "e"}, [CLOSED, CLOSED], CLOSED),
        ("some_unknown_gauge", {}, [7.0, 2.0, 5.0], 7.0),
    ],
    ids=[
        "active-requests-sum",
        "config-version-newest",
        "endpoints-max",
        "breaker-probing-over-closed",
        "breaker-tripped-over-probing",
        "breaker-order-free",
        "breaker-closed",
        "unknown-gauge-max",
    ],
)
def test_gauge_rules(name: str, labels: dict[str, str], workers: list[float], expected: float) -> None:
    sources = [[family(name, "gauge", (name, labels, v))] for v in workers]
    [sample] = merged_one(*sources).samples
    assert sample.value == expected


def test_every_gauge_meshgate_declares_has_a_rule() -> None:
    registry = CollectorRegistry()
    from telemetry.metrics import Metrics

    metrics = Metrics(registry)
    metrics.state_gauges(lambda: [], lambda: [])
    gauges = {m.name for m in registry.collect() if m.type == "gauge"}
    assert gauges == set(GAUGE_RULES)


# --- exemplars, types, metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (Exemplar({"trace_id": "old"}, 0.1, 100.0), Exemplar({"trace_id": "new"}, 0.2, 200.0), "new"),
        (Exemplar({"trace_id": "new"}, 0.1, 200.0), Exemplar({"trace_id": "old"}, 0.2, 100.0), "new"),
        (Exemplar({"trace_id": "old"}, 0.1, Timestamp(100, 5)), Exemplar({"trace_id": "new"}, 0.1, 100.5), "new"),
        (None, Exemplar({"trace_id": "only"}, 0.1, 100.0), "only"),
        (Exemplar({"trace_id": "only"}, 0.1, 100.0), None, "only"),
        (Exemplar({"trace_id": "stamped"}, 0.1, 1.0), Exemplar({"trace_id": "unstamped"}, 0.1), "stamped"),
    ],
    ids=["second-newer", "first-newer", "timestamp-vs-float", "only-second", "only-first", "stamped-wins"],
)
def test_newest_exemplar_wins(first: Exemplar | None, second: Exemplar | None, expected: str) -> None:
    def source(exemplar: Exemplar | None) -> list[Metric]:
        rows: list[Row] = [("d_bucket", {"le": "0.5"}, 1.0), ("d_bucket", {"le": "+Inf"}, 1.0)]
        return [family("d", "histogram", *rows, exemplars={0: exemplar} if exemplar else {})]

    bucket = merged_one(source(first), source(second)).samples[0]
    assert bucket.value == 2.0
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels == {"trace_id": expected}


def test_type_mismatch_keeps_the_first_type_and_names_the_conflict() -> None:
    counter = family("x", "counter", ("x_total", {}, 3.0))
    gauge = family("x", "gauge", ("x", {}, 100.0))
    other = family("y", "gauge", ("y", {}, 1.0))
    result = merge_families([[counter], [gauge, other], [counter]])
    assert [(m.name, m.type) for m in result.families] == [("x", "counter"), ("y", "gauge")]
    assert values(result.families[0]) == {("x_total", ()): 6.0}  # the gauge's 100 is not mixed in
    assert result.conflicts == ("x",)


def test_help_unit_and_first_seen_order_are_kept() -> None:
    a = Metric("b_seconds", "first help", "gauge", unit="seconds")
    a.add_sample("b_seconds", {}, 1.0)
    b = Metric("b_seconds", "other help", "gauge", unit="seconds")
    b.add_sample("b_seconds", {}, 2.0)
    z = family("z", "counter", ("z_total", {}, 1.0))
    result = merge_families([[z, a], [b]])
    assert [m.name for m in result.families] == ["z", "b_seconds"]
    merged = result.families[1]
    assert (merged.documentation, merged.unit, merged.type) == ("first help", "seconds", "gauge")


def test_no_sources_and_empty_sources() -> None:
    assert merge_families([]).families == ()
    assert merge_families([[], []]).families == ()


# --- round trip through the real exposition ---------------------------------------------------------------------


def worker_registry(requests: int, exemplar_trace: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    duration = Histogram("http_server_request_duration_seconds", "Duration.", ["http_route"], registry=registry)
    for _ in range(requests):
        duration.labels("api").observe(0.02, exemplar={"trace_id": exemplar_trace})
    Counter("meshgate_local_replies_total", "Local replies.", ["reason"], registry=registry).labels("x").inc(requests)
    Gauge("http_server_active_requests", "Active.", registry=registry).set(requests)
    return registry


def test_merged_families_render_as_openmetrics_that_parses_back() -> None:
    first, second = worker_registry(3, "aaaa"), worker_registry(5, "bbbb")  # second observed last: newest exemplar
    peer = parse_openmetrics(generate_latest(second).decode())
    result = merge_families([list(first.collect()), peer])

    class Families:
        def collect(self) -> tuple[Metric, ...]:
            return result.families

    text = generate_latest(Families()).decode()
    assert text.endswith("# EOF\n")
    parsed = {m.name: m for m in parse_openmetrics(text)}
    samples: dict[str, list[Sample]] = {n: m.samples for n, m in parsed.items()}
    count = next(s for s in samples["http_server_request_duration_seconds"] if s.name.endswith("_count"))
    assert count.value == 8.0
    bucket = next(s for s in samples["http_server_request_duration_seconds"] if s.labels.get("le") == "0.025")
    assert bucket.value == 8.0
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels == {"trace_id": "bbbb"}
    replies = next(s for s in samples["meshgate_local_replies"] if s.name.endswith("_total"))
    assert replies.value == 8.0
    assert samples["http_server_active_requests"][0].value == 8.0


def test_parse_openmetrics_rejects_a_page_without_eof() -> None:
    with pytest.raises(ValueError, match="EOF"):
        parse_openmetrics("# TYPE x gauge\nx 1\n")
