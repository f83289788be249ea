"""meshgate's Grafana dashboards as data for tests: every query they run, ready for Prometheus, and its metric names.

``dashboards()`` loads ``grafana/dashboards/*.json``; ``targets()`` lists one ``Target`` (dashboard uid, panel title,
expression) per panel query, in rows too; ``substitute()`` replaces Grafana's variables by values a plain Prometheus
query accepts (every service and route, fixed windows); ``metric_names()`` finds the series names an expression
reads, skipping functions, label names, keywords, strings and durations, and ``family()`` maps a histogram's
``_bucket``/``_count``/``_sum`` series to its family name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DASHBOARDS_DIR",
    "GRAFANA_DIR",
    "Target",
    "dashboards",
    "family",
    "metric_names",
    "panels",
    "substitute",
    "targets",
    "variable_queries",
]

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"

# What Grafana would put in place of each variable: every service and route (the `All` value is the regex `.*`), and
# windows that fit a 5 s scrape interval ($__rate_interval is at least four scrape intervals).
VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__range": "5m",
    "service": ".*",
    "route": ".*",
    "datasource": "prometheus",
}

# `$name`, `${name}` and `${name:format}` (not `$1`: a regex group in label_replace).
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")

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
    def query(self) -> str:
        """``expr`` with the variables substituted: what to send to Prometheus."""
        return substitute(self.expr)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref_id}]: {self.query}"


def dashboards(directory: Path = DASHBOARDS_DIR) -> dict[Path, dict[str, Any]]:
    """Every dashboard JSON under ``directory``, by path."""
    return {path: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows excluded but the panels of collapsed rows included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


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


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced (``VARIABLES`` by default); an unknown variable is a ValueError,
    so a dashboard cannot use one the tests do not know how to fill in."""
    table = values if values is not None else VARIABLES

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in table:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return table[name]

    return _VARIABLE.sub(one, expr)


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` selects (``http_server_request_duration_seconds_bucket``, not its family).

    A name is an identifier that is not a keyword, not called (``rate(``), and not inside label matchers (``{...}``),
    a range (``[...]``), a grouping clause (``by (...)``) or a string. Variables are substituted first, so
    ``[$__rate_interval]`` is a range like any other.
    """
    text = _STRING.sub('""', substitute(expr))
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
