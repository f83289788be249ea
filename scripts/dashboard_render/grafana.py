"""meshgate's Grafana dashboards as data: the JSON files, their panels, and Grafana's variables filled in.

What the renderer draws and what the dashboard tests query come from here, so both read a dashboard the same way.
Standard library only (no matplotlib): the tests import it without the ``docs`` extra.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ALL", "DASHBOARDS", "dashboards", "legend_text", "panels", "substitute", "variables"]

DASHBOARDS = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"
ALL = ".*"  # the "All" value of the multi-select variables (each dashboard sets `allValue` to it)

# `$name`, `${name}` and `${name:format}` (not `$1`: a regex group in label_replace).
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def dashboards(directory: Path = DASHBOARDS) -> dict[Path, dict[str, Any]]:
    """Every dashboard JSON file under ``directory``, by path, in name order."""
    return {path: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def panels(board: dict[str, Any], *, rows: bool = False) -> Iterator[dict[str, Any]]:
    """Every panel in order, the panels of collapsed rows included; with ``rows``, each row too, before its panels
    (the renderer draws row titles; the tests want only panels that query)."""
    for panel in board.get("panels", []):
        is_row = panel.get("type") == "row"
        if rows or not is_row:
            yield panel
        if is_row:
            yield from panel.get("panels", [])


def variables(*, rate_interval: str, interval: str, range_: str) -> dict[str, str]:
    """What Grafana puts in place of each variable the dashboards use, with every service and route selected
    ("All") and the given windows (``$__rate_interval`` is at least four scrape intervals in Grafana)."""
    return {
        "service": ALL,
        "route": ALL,
        "datasource": "prometheus",
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
    }


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's variables replaced by ``values``; a variable not in ``values`` is a ``ValueError``, so
    a dashboard cannot use one nobody knows how to fill in."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def legend_text(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by its value; ``__auto`` (or none) lists the labels."""
    if template and template != "__auto":
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), template).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or labels.get("__name__", "value")
