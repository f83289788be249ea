"""Metric families with rules of their own: capped denial reasons; reload results exported from the start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from telemetry.metrics import DENIAL_REASONS, Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["http_route"], s.labels["reason"]): s.value
        for family in metrics.registry.collect()
        if family.name == "meshgate_authz_denials"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_each_reason_is_its_own_series_per_route() -> None:
    metrics = Metrics(CollectorRegistry())
    for route, reason in [("a", "role x required"), ("a", "role x required"), ("b", "role x required"), ("a", "")]:
        metrics.authz_denials.inc(route, reason)
    assert _samples(metrics) == {("a", "role x required"): 2, ("b", "role x required"): 1, ("a", "unspecified"): 1}


def test_reasons_beyond_the_cap_count_as_other_and_are_not_remembered() -> None:
    metrics = Metrics(CollectorRegistry())
    for n in range(DENIAL_REASONS + 30):  # a policy that puts a user id in its reason
        metrics.authz_denials.inc("r", f"user {n} may not")
    metrics.authz_denials.inc("r", "user 0 may not")  # a reason that got its label before the cap keeps it
    samples = _samples(metrics)
    assert len(samples) == DENIAL_REASONS + 1
    assert samples[("r", "other")] == 30
    assert samples[("r", "user 0 may not")] == 2


def test_reasons_sharing_their_labelled_prefix_share_one_cache_entry() -> None:
    metrics = Metrics(CollectorRegistry())
    for n in range(1000):  # a long fixed text, then an id past the cut
        metrics.authz_denials.inc("r", "x" * 120 + str(n))
    assert _samples(metrics) == {("r", "x" * 120): 1000}
    assert len(metrics.authz_denials._children) == 1


def test_long_reasons_are_cut() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.authz_denials.inc("r", "x" * 500)
    [(_, reason)] = _samples(metrics)
    assert reason == "x" * 120


def test_both_reload_results_are_exported_at_zero_before_any_reload() -> None:
    # rate()/increase() cannot count a series' first sample: a first rejected config must not be invisible.
    metrics = Metrics(CollectorRegistry())
    for result in ("applied", "rejected"):
        assert metrics.registry.get_sample_value("meshgate_config_reloads_total", {"result": result}) == 0.0
