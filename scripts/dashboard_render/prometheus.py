"""The three read calls the renderer makes to Prometheus's HTTP API: instant query, range query, exemplars.

A refused query (bad PromQL, a timeout on Prometheus's side) is a ``PrometheusError``: its panel shows the error and
the other panels are still drawn. No answer at all is ``PrometheusUnreachable``: nothing can be drawn.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["Exemplar", "Prometheus", "PrometheusError", "PrometheusUnreachable", "Series", "number"]


class PrometheusError(RuntimeError):
    """A query Prometheus refused: the panel shows it, the run goes on."""


class PrometheusUnreachable(RuntimeError):
    """No answer from Prometheus at all."""


@dataclass(frozen=True, slots=True)
class Series:
    labels: dict[str, str]
    times: list[float]
    values: list[float]  # NaN where Prometheus answered NaN (a quantile of no requests, 0/0)


@dataclass(frozen=True, slots=True)
class Exemplar:
    time: float
    value: float
    trace_id: str


def number(text: str) -> float:
    """A sample value as Prometheus writes it (``"NaN"``, ``"+Inf"`` included); anything else is NaN."""
    try:
        return float(text)
    except ValueError:
        return math.nan


class Prometheus:
    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, params: dict[str, str]) -> Any:
        # POST: a long expression does not fit every proxy's URL limit, and Prometheus accepts both.
        body = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/{path}", data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400/422/503 carry Prometheus's JSON error
            with error:
                try:
                    payload = json.loads(error.read() or b"{}")
                except ValueError:
                    raise PrometheusError(f"HTTP {error.code} from {self.url}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PrometheusUnreachable(f"cannot reach Prometheus at {self.url}: {reason}") from None
        except ValueError:
            raise PrometheusError(f"{self.url} did not answer JSON (is it Prometheus?)") from None
        if payload.get("status") != "success":
            raise PrometheusError(f"{payload.get('errorType', 'error')}: {payload.get('error', payload)}")
        return payload["data"]

    def check(self) -> None:
        """Raise ``PrometheusUnreachable`` (or ``PrometheusError``) unless the query API answers."""
        self._call("query", {"query": "1"})

    def query(self, expr: str, at: float) -> list[Series]:
        data = self._call("query", {"query": expr, "time": f"{at:.3f}"})
        if data["resultType"] in ("scalar", "string"):
            stamp, value = data["result"]
            return [Series({}, [float(stamp)], [number(value)])]
        return [
            Series(item["metric"], [float(item["value"][0])], [number(item["value"][1])]) for item in data["result"]
        ]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._call(
            "query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        )
        return [
            Series(
                item["metric"],
                [float(stamp) for stamp, _ in item["values"]],
                [number(value) for _, value in item["values"]],
            )
            for item in data["result"]
        ]

    def exemplars(self, expr: str, start: float, end: float) -> list[Exemplar]:
        data = self._call("query_exemplars", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}"})
        return [
            Exemplar(float(item["timestamp"]), number(item["value"]), item["labels"].get("trace_id", ""))
            for group in data or []
            for item in group.get("exemplars", [])
        ]
