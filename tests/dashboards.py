"""meshgate's Grafana dashboards as data for tests: every query they run, ready for Prometheus, and its metric names.

The dashboards are read by ``scripts/dashboard_render/grafana.py``, the renderer's own module, so the tests run the
queries the pictures are drawn from. ``targets()`` lists one ``Target`` (dashboard uid, panel title, expression) per
panel query, in rows too, and ``Target.query`` fills in Grafana's variables (``VARIABLES``: every service and route,
fixed windows); ``EXERCISED`` names the queries that must show more than 0 on the demo stack, not merely data;
``variable_queries()`` gives a dashboard's query variables; ``metric_names()`` finds the series names
an expression reads, skipping functions, label names, keywords, strings and durations, and ``family()`` maps a
histogram's ``_bucket``/``_count``/``_sum`` series to its family name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.dashboard_render.grafana import DASHBOARDS, dashboards, panels, substitute, variables

__all__ = [
    "DASHBOARDS",
    "EXERCISED",
    "GRAFANA_DIR",
    "VARIABLES",
    "Target",
    "family",
    "metric_names",
    "targets",
    "variable_queries",
]

GRAFANA_DIR = DASHBOARDS.parent
# Windows that fit a 5 s scrape interval ($__rate_interval is at least four scrape intervals in Grafana).
VARIABLES = variables(rate_interval="30s", interval="15s", range_="5m")

# The panels the demo's traffic (gateway/demo/traffic.py) and the e2e test's pushes make move: on the demo stack each
# must show a value above 0, not merely data. `A or B * 0` draws zeros, and so does a matcher that selects nothing
# next to one that selects something: "has data" alone cannot tell a working panel from a broken one there.
# Key: (dashboard uid, panel title, refId); value: the series that must add up to more than 0, as label -> regex
# (fully matched; {} = every series of the result).
_FIVE_XX = {"http_response_status_code": "5.."}
EXERCISED: dict[tuple[str, str, str], dict[str, str]] = {
    # POST /orders charges through payments, never retried: payments-b's 503s reach the client.
    ("meshgate-overview", "Success rate (non-5xx share)", "A"): {},
    ("meshgate-overview", "Success rate (non-5xx share) by service and route", "A"): {},
    ("meshgate-overview", "Responses by status code", "A"): _FIVE_XX,
    ("meshgate-overview", "5xx responses by service and route", "A"): {},
    # bob (no role) and carol (denied by the shadow candidate), a request without a token and one with a bad one.
    ("meshgate-policy", "Denied share (policy)", "A"): {},
    ("meshgate-policy", "Authentication failures per second", "A"): {},
    ("meshgate-policy", "Shadow policy disagreements per second", "A"): {},
    ("meshgate-policy", "Authorization decisions by route: allow / deny / error", "A"): {"decision": "deny"},
    ("meshgate-policy", "Deny reasons by route", "A"): {},
    ("meshgate-policy", "Top deny reasons over the time range", "A"): {},
    ("meshgate-policy", "Authentication failures by reason", "A"): {},
    ("meshgate-policy", "Decision cache hit rate by route", "A"): {},  # orders caches decisions for 5 s
    ("meshgate-policy", "Shadow policy disagreements by route", "A"): {},
    # payments-b answers 503 to ~30% of requests: retried, ejected; the test's stingy budget refuses retries.
    ("meshgate-resilience", "Upstream attempt outcomes: status code or error", "A"): {
        "upstream": "payments",
        **_FIVE_XX,
    },
    ("meshgate-resilience", "Retries by upstream", "A"): {},
    ("meshgate-resilience", "Retries refused: retry budget exhausted", "A"): {},
    ("meshgate-resilience", "Outlier ejections by upstream", "A"): {},
    ("meshgate-resilience", "Rate-limited requests by route (429)", "A"): {},  # a burst every ten seconds
    ("meshgate-resilience", "Local replies by reason", "A"): {},
    # The e2e test's invalid push (the config service refuses it) and restart-only change (the gateway refuses it).
    ("meshgate-control-plane", "Rejected configs: refused by the config service, refused by a gateway", "A"): {},
    ("meshgate-control-plane", "Rejected configs: refused by the config service, refused by a gateway", "B"): {},
    ("meshgate-control-plane", "Config pushes by result (since the config service started)", "A"): {
        "result": "rejected"
    },
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# Label lists: `by (a, b)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`, `group_right (...)`.
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:ms|s|m|h|d|w|y)*")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "start",
        "end",
        "inf",
        "nan",
    }
)
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@dataclass(frozen=True, slots=True)
class Target:
    """One query of one panel: ``expr`` as written in the dashboard (with Grafana's variables)."""

    dashboard: str
    panel: str
    expr: str
    ref_id: str
    instant: bool = False
    exemplar: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        """``(dashboard uid, panel title, refId)``: how ``EXERCISED`` names it."""
        return self.dashboard, self.panel, self.ref_id

    @property
    def query(self) -> str:
        """``expr`` with the variables substituted: what to send to Prometheus."""
        return substitute(self.expr, VARIABLES)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref_id}]: {self.query}"


def targets(boards: dict[Path, dict[str, Any]] | None = None) -> list[Target]:
    """One ``Target`` per panel query of every dashboard, in dashboard and panel order."""
    found = []
    for board in (boards if boards is not None else dashboards()).values():
        for panel in panels(board):
            for target in panel.get("targets", []):
                found.append(
                    Target(
                        dashboard=board["uid"],
                        panel=panel.get("title", ""),
                        expr=target.get("expr", ""),
                        ref_id=target.get("refId", ""),
                        instant=bool(target.get("instant", False)),
                        exemplar=bool(target.get("exemplar", False)),
                    )
                )
    return found


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """``{variable name: its query}`` for the dashboard's query variables (``label_values(...)`` and the like)."""
    found = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        found[variable["name"]] = str(query or variable.get("definition", ""))
    return found


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` selects (``http_server_request_duration_seconds_bucket``, not its family).

    A name is an identifier that is not a keyword, not called (``rate(``), and not inside label matchers (``{...}``),
    a range (``[...]``), a grouping clause (``by (...)``) or a string. Variables are substituted first, so
    ``[$__rate_interval]`` is a range like any other.
    """
    text = _STRING.sub('""', substitute(expr, VARIABLES))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation: rate(, sum(, histogram_quantile(
        names.add(name)
    return names


def family(name: str) -> str:
    """The family a series name belongs to: a histogram's ``_bucket``/``_count``/``_sum`` suffix removed."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name
