"""A panel's queries over a time window, as Grafana would send them with every service and route selected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .grafana import substitute, variables
from .prometheus import Exemplar, Prometheus, PrometheusError, Series

__all__ = ["Result", "Window", "run_queries"]


@dataclass(frozen=True, slots=True)
class Window:
    """A ``minutes``-long view ending at ``end`` (Unix time), one point every ``step`` seconds."""

    end: float
    minutes: float
    step: float
    rate_interval: str  # what $__rate_interval becomes: at least four scrape intervals, as Grafana makes it

    @property
    def start(self) -> float:
        return self.end - self.minutes * 60

    def variables(self) -> dict[str, str]:
        return variables(
            rate_interval=self.rate_interval,
            interval=f"{max(1, int(self.step))}s",
            range_=f"{max(1, round(self.minutes * 60))}s",
        )


@dataclass
class Result:
    """One target's answer: its series (and exemplars), or the error text the panel shows instead."""

    legend: str
    series: list[Series] = field(default_factory=list)
    error: str | None = None
    exemplars: list[Exemplar] = field(default_factory=list)


def run_queries(prometheus: Prometheus, panel: dict[str, Any], window: Window) -> list[Result]:
    """Every target of ``panel``: an instant query at the window's end for the targets marked instant, a range query
    over the window for the others, and the exemplars of the targets that ask for them."""
    results = []
    values = window.variables()
    for target in panel.get("targets", []):
        result = Result(target.get("legendFormat", "__auto"))
        try:
            expr = substitute(target.get("expr", ""), values)
            if target.get("instant"):
                result.series = prometheus.query(expr, window.end)
            else:
                result.series = prometheus.query_range(expr, window.start, window.end, window.step)
            if target.get("exemplar"):
                result.exemplars = prometheus.exemplars(expr, window.start, window.end)
        except (PrometheusError, ValueError) as error:  # ValueError: a variable nobody fills in
            result.error = str(error)
        results.append(result)
    return results
