"""The Grafana dashboards and provisioning files, checked without Grafana or Prometheus (no sockets).

Every query names only series meshgate really exports (the set is read from the real registries, so a renamed or
removed family breaks the panel that uses it here, not on an SRE's screen), every panel goes through the
``datasource`` variable, every dashboard has its fixed uid and the service/route variables, windows come from
Grafana's variables, and the provisioning files point at data sources and paths that exist. ``promtool`` (when
installed) parses every expression.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from scripts.dashboard_render.grafana import DASHBOARDS, dashboards, panels, substitute
from telemetry.metrics import ConfigServiceMetrics, Metrics
from tests.dashboards import EXERCISED, GRAFANA_DIR, VARIABLES, Target, family, metric_names, targets, variable_queries

UIDS = {"meshgate-overview", "meshgate-policy", "meshgate-resilience", "meshgate-control-plane"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus makes itself for every target: a dashboard may use them next to meshgate's own.
PROMETHEUS_SERIES = {"up"}

BOARDS = dashboards()
TARGETS = targets(BOARDS)


def exported_series() -> set[str]:
    """Every series name meshgate's processes can expose, from the real registries: a counter ``x`` as
    ``x_total``, a histogram as ``x_bucket``/``x_count``/``x_sum``, a gauge as itself."""
    gateway = Metrics()
    # The scrape-time families are registered by the running gateway; empty readers register them here.
    gateway.state_gauges(lambda: [], lambda: [])
    gateway.bundle_revisions(lambda: [])
    gateway.log_drops(lambda: 0)
    gateway.span_counts(lambda: {})
    names: set[str] = set()
    for registry in (gateway.registry, ConfigServiceMetrics().registry):
        for metric in registry.collect():
            if metric.type == "counter":
                names.add(metric.name + "_total")
            elif metric.type == "histogram":
                names.update(metric.name + suffix for suffix in ("_bucket", "_count", "_sum"))
            else:
                names.add(metric.name)
    return names


EXPORTED = exported_series()


def _ids(targets: list[Target]) -> list[str]:
    return [f"{t.dashboard}/{t.panel}/{t.ref_id}" for t in targets]


def _board(uid: str) -> dict[str, Any]:
    return next(board for board in BOARDS.values() if board["uid"] == uid)


def _variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def test_the_four_dashboards_have_their_fixed_unique_uids() -> None:
    uids = [board["uid"] for board in BOARDS.values()]
    assert sorted(uids) == sorted(UIDS), uids
    for path, board in BOARDS.items():
        # The file is named for its uid, so the renderer's PNG names and the files match.
        assert path.stem == board["uid"].removeprefix("meshgate-"), path
        assert board["schemaVersion"] >= 39
        assert board["id"] is None  # provisioned: Grafana assigns the database id
        assert "meshgate" in board["tags"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panels_have_titles_descriptions_unique_ids_and_fit_the_grid(uid: str) -> None:
    board = _board(uid)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in panels(board):
        assert panel["title"].strip(), panel
        assert len(panel.get("description", "")) > 30, f"{panel['title']}: say what question the panel answers"
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, (panel["title"], grid)


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_dashboard_has_the_datasource_service_and_route_variables(uid: str) -> None:
    variables = _variables(_board(uid))
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    wanted = ["service"] if uid == "meshgate-control-plane" else ["service", "route"]
    queries = variable_queries(_board(uid))
    for name in wanted:
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert (variable["multi"], variable["includeAll"], variable["allValue"]) == (True, True, ".*"), name
        label_values = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", queries[name])
        assert label_values is not None, queries[name]
        selector, label = label_values.groups()
        assert label == ("service" if name == "service" else "http_route")
        assert metric_names(selector) <= EXPORTED, selector
    if "route" in variables:
        # The routes offered are those of the services picked.
        assert 'service=~"$service"' in queries["route"]


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_panel_and_target_queries_through_the_datasource_variable(uid: str) -> None:
    for panel in panels(_board(uid)):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])


@pytest.mark.parametrize("target", TARGETS, ids=_ids(TARGETS))
def test_every_query_reads_series_meshgate_exports(target: Target) -> None:
    names = metric_names(target.expr)
    assert names, f"no metric found in {target.expr!r}"
    unknown = sorted(names - EXPORTED - PROMETHEUS_SERIES)
    assert not unknown, f"{target}: not exported by meshgate: {unknown} (families: {sorted(map(family, unknown))})"


def test_the_exported_set_is_read_from_the_registries() -> None:
    # The check above is only as good as this set: it must hold what dashboards need and nothing made up.
    assert {
        "http_server_request_duration_seconds_bucket",
        "meshgate_authz_decisions_total",
        "meshgate_circuit_breaker_state",
        "meshgate_configservice_push_to_applied_seconds_count",
    } <= EXPORTED
    assert "meshgate_authz_decisions" not in EXPORTED  # the family name is not a series Prometheus stores
    assert "meshgate_no_such_family_total" not in EXPORTED


def test_every_query_uses_grafanas_windows_and_never_invents_data() -> None:
    problems = []
    for target in TARGETS:
        # A fixed [5m] ignores the scrape interval and the zoom; $__rate_interval adapts to both.
        for window in re.findall(r"\[([^\]]*)\]", target.expr):
            if window not in ("$__rate_interval", "$__range"):
                problems.append(f"{target.dashboard}/{target.panel}: window [{window}]")
        # `or vector(0)` draws a flat 0 where there is no data at all: an empty panel must stay empty.
        if "vector(" in target.expr:
            problems.append(f"{target.dashboard}/{target.panel}: vector() in {target.expr!r}")
    assert problems == []


def test_no_query_matches_on_le() -> None:
    # Prometheus 3 (compose) writes `le` values as floats ("1.0"), 2.x (the e2e test's) as they were exposed ("1"):
    # a matcher on `le` would select different buckets on the two; grouping by it and histogram_quantile do not care.
    matchers = [m for t in TARGETS for m in re.findall(r"\{[^{}]*\}", t.expr) if re.search(r"\ble\s*(=|!=|=~|!~)", m)]
    assert matchers == []


def test_every_query_is_valid_promql() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [{"record": f"dashboard:query_{i}", "expr": t.query} for i, t in enumerate(TARGETS)],
            }
        ]
    }
    result = subprocess.run(
        [promtool, "check", "rules", "/dev/stdin"],
        input=yaml.safe_dump(rules).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_legends_name_only_labels_the_queries_keep() -> None:
    # `{{http_route}}` in a legend of a query that sums `by (service)` would print an empty string on every line.
    problems = []
    for board in BOARDS.values():
        for panel in panels(board):
            for target in panel["targets"]:
                legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                groupings = re.findall(r"\bby\s*\(([^)]*)\)", target["expr"])
                if not groupings:
                    continue  # a plain selector keeps every label
                kept = {label.strip() for grouping in groupings for label in grouping.split(",")}
                if legend - kept:
                    problems.append(f"{board['uid']}/{panel['title']}: {sorted(legend - kept)} not in by ({kept})")
    assert problems == []


def test_the_queries_required_above_zero_exist_and_keep_the_labels_they_are_filtered_on() -> None:
    # tests/e2e/test_dashboards.py holds these to a value > 0: a renamed panel must not drop out of that check.
    by_key = {target.key: target for target in TARGETS}
    assert sorted(set(EXERCISED) - set(by_key)) == []
    for key, labels in EXERCISED.items():
        kept = {
            label.strip()
            for grouping in re.findall(r"\bby\s*\(([^)]*)\)", by_key[key].expr)
            for label in grouping.split(",")
        }
        assert set(labels) <= kept, (key, sorted(set(labels) - kept))


def test_the_latency_heatmap_carries_exemplars() -> None:
    heatmaps = [panel for panel in panels(_board("meshgate-overview")) if panel["type"] == "heatmap"]
    assert heatmaps
    for panel in heatmaps:
        for target in panel["targets"]:
            assert target["format"] == "heatmap"
            assert target["exemplar"] is True
            assert "http_server_request_duration_seconds_bucket" in metric_names(target["expr"])
        assert panel["options"]["calculate"] is False  # the buckets are already a histogram


def test_datasource_provisioning_links_exemplars_to_jaeger() -> None:
    document = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yaml").read_text())
    assert document["apiVersion"] == 1
    sources = {source["uid"]: source for source in document["datasources"]}
    prometheus, jaeger = sources["prometheus"], sources["jaeger"]
    assert (prometheus["type"], prometheus["url"]) == ("prometheus", "http://prometheus:9090")
    assert (jaeger["type"], jaeger["url"]) == ("jaeger", "http://jaeger:16686")
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    assert all(destination["datasourceUid"] in sources for destination in destinations)
    # The dashboards' default data source is the provisioned Prometheus.
    for board in BOARDS.values():
        current = _variables(board)["datasource"]["current"]
        assert current["value"] == "prometheus", board["uid"]


def test_dashboard_provisioning_loads_the_dashboards_directory() -> None:
    document = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yaml").read_text())
    assert document["apiVersion"] == 1
    [provider] = document["providers"]
    assert (provider["type"], provider["folder"]) == ("file", "meshgate")
    # docker compose mounts grafana/dashboards here.
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert sorted(path.name for path in DASHBOARDS.glob("*.json")) == sorted(
        uid.removeprefix("meshgate-") + ".json" for uid in UIDS
    )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'rate(http_server_request_duration_seconds_count{service=~"$service"}[$__rate_interval])',
            {"http_server_request_duration_seconds_count"},
        ),
        (
            "histogram_quantile(0.99, sum by (service, le) (rate(x_bucket[5m])))",
            {"x_bucket"},
        ),
        ("sum(rate(a_total[1m])) by (route) / on (route) group_left (le) b", {"a_total", "b"}),
        ('label_replace(up, "dst", "$1", "instance", "(.*):.*")', {"up"}),
        ("a offset 5m > bool 1e-3 and ignoring (x) c unless d or e", {"a", "c", "d", "e"}),
        ("max without (pod) (g) - 2 * h[1h:30s] @ end()", {"g", "h"}),
        ("topk(5, meshgate_x{reason='by (x)', a!~\"rate(y)\"})", {"meshgate_x"}),
        ("sum by (le) (increase(k_bucket[$__range])) > Inf", {"k_bucket"}),
    ],
)
def test_metric_names_skip_functions_labels_keywords_strings_and_durations(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_family_strips_histogram_suffixes_only() -> None:
    assert family("http_server_request_duration_seconds_bucket") == "http_server_request_duration_seconds"
    assert family("meshgate_configservice_push_to_applied_seconds_count") == (
        "meshgate_configservice_push_to_applied_seconds"
    )
    assert family("meshgate_authz_decisions_total") == "meshgate_authz_decisions_total"


def test_substitute_fills_grafanas_variables_and_refuses_unknown_ones() -> None:
    assert substitute('x{service=~"$service",r=~"${route}"}[$__rate_interval] [$__range] $__interval', VARIABLES) == (
        'x{service=~".*",r=~".*"}[30s] [5m] 15s'
    )
    assert substitute('label_replace(up, "d", "$1", "i", "(.*)")', VARIABLES) == (
        'label_replace(up, "d", "$1", "i", "(.*)")'
    )
    with pytest.raises(ValueError, match=r"\$nope"):
        substitute("x{a=~'$nope'}", VARIABLES)


def test_panels_skip_rows_unless_asked_and_include_collapsed_rows_panels() -> None:
    board = {
        "panels": [
            {"type": "row", "title": "open"},
            {"type": "stat", "title": "a"},
            {"type": "row", "title": "collapsed", "panels": [{"type": "table", "title": "b"}]},
        ]
    }
    assert [panel["title"] for panel in panels(board)] == ["a", "b"]
    assert [panel["title"] for panel in panels(board, rows=True)] == ["open", "a", "collapsed", "b"]
