#!/usr/bin/env python3
"""Draw meshgate's Grafana dashboards as PNGs from a live Prometheus, without Grafana.

    python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 --out docs/img [--minutes 5]

For each ``grafana/dashboards/<name>.json`` it runs every panel's queries against Prometheus (a range query over
the last ``--minutes``, or an instant query for the targets marked instant), with Grafana's variables filled in
as the "All" selection would (``$service``/``$route`` -> ``.*``), and draws the panels where the dashboard places
them (its 24-column grid) into ``<out>/dashboard-<name>.png``: time series as lines (stacked where the panel
stacks), heatmaps as per-bucket request rates with the exemplars Prometheus stored on top, breaker states as
coloured bands, stats as their last value, tables as tables. The picture is plotted from the same query results
Grafana would show; it is not a Grafana screenshot, and says so in its header.

Exit status: 0 when every query answered, 1 when some query failed (its panel shows the error), 2 when Prometheus
cannot be reached at all (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import matplotlib
except ImportError:  # an optional dependency: say how to get it instead of a traceback
    sys.exit("error: matplotlib is not installed: pip install -e '.[docs]'")

matplotlib.use("Agg")  # before pyplot: no display here, and none needed

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import ScaledTranslation

__all__ = ["Prometheus", "PrometheusError", "Series", "main", "render_dashboard"]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"

# Grafana's dark theme, so the PNGs read like the dashboards they stand for.
BACKGROUND = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
MUTED = "#8e8e99"
GRID = "#2c3235"
COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "orange": "#ff9830",
    "yellow": "#fade2a",
    "blue": "#5794f2",
    "purple": "#b877d9",
    "dark-orange": "#fa6400",
}
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d", "#fade2a"]

UNIT_IN = 0.36  # inches per Grafana grid row (30 px plus margins at 100 dpi)
WIDTH_IN = 18.0
DPI = 100
MAX_LEGEND = 7  # series names under a plot; the rest is counted ("+N more series")
LEGEND_IN = 0.62  # inches under a plot for its legend: four rows of two columns


class PrometheusError(RuntimeError):
    """A query Prometheus refused (bad PromQL, timeout): the panel shows it, the run goes on."""


class PrometheusUnreachable(RuntimeError):
    """No answer from Prometheus at all: nothing can be drawn."""


@dataclass(frozen=True, slots=True)
class Series:
    labels: dict[str, str]
    times: list[float]
    values: list[float]


@dataclass(frozen=True, slots=True)
class Exemplar:
    time: float
    value: float
    trace_id: str


class Prometheus:
    """The three read calls the renderer needs from Prometheus's HTTP API."""

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
        """Raise ``PrometheusUnreachable`` unless the API answers."""
        self._call("query", {"query": "1"})

    def query(self, expr: str, at: float) -> list[Series]:
        data = self._call("query", {"query": expr, "time": f"{at:.3f}"})
        if data["resultType"] in ("scalar", "string"):
            stamp, value = data["result"]
            return [Series({}, [float(stamp)], [_number(value)])]
        return [
            Series(item["metric"], [float(item["value"][0])], [_number(item["value"][1])]) for item in data["result"]
        ]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._call(
            "query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        )
        return [
            Series(
                item["metric"],
                [float(stamp) for stamp, _ in item["values"]],
                [_number(value) for _, value in item["values"]],
            )
            for item in data["result"]
        ]

    def exemplars(self, expr: str, start: float, end: float) -> list[Exemplar]:
        data = self._call("query_exemplars", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}"})
        return [
            Exemplar(float(item["timestamp"]), _number(item["value"]), item["labels"].get("trace_id", ""))
            for group in data or []
            for item in group.get("exemplars", [])
        ]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass(frozen=True, slots=True)
class Window:
    """What Grafana would put in place of its time variables for a ``minutes``-long view ending at ``end``."""

    end: float
    minutes: float
    step: float
    rate_interval: str

    @property
    def start(self) -> float:
        return self.end - self.minutes * 60

    def substitute(self, expr: str) -> str:
        values = {
            "service": ".*",
            "route": ".*",
            "datasource": "prometheus",
            "__rate_interval": self.rate_interval,
            "__interval": f"{max(1, int(self.step))}s",
            "__range": f"{max(1, round(self.minutes * 60))}s",
        }

        def one(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            return values.get(name, match.group(0))

        return re.sub(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)", one, expr)


@dataclass
class Result:
    """One target's answer: series, or the error text to show in the panel."""

    legend: str
    series: list[Series] = field(default_factory=list)
    error: str | None = None
    exemplars: list[Exemplar] = field(default_factory=list)


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Rows and panels in order, the panels of collapsed rows after their row."""
    for panel in board.get("panels", []):
        yield panel
        if panel.get("type") == "row":
            yield from panel.get("panels", [])


def legend_text(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by its value; ``__auto`` (or none) lists the labels."""
    if template and template != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or labels.get("__name__", "value")


def formatter(unit: str) -> Callable[[float], str]:
    """A value as Grafana would print it in ``unit`` (the few units the dashboards use)."""

    def seconds(v: float) -> str:
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"

    def short(v: float) -> str:
        for bound, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " K")):
            if abs(v) >= bound:
                return f"{v / bound:.3g}{suffix}"
        return f"{v:.3g}"

    def percent(v: float) -> str:
        return f"{v * 100:.4g}%"

    def per_second(v: float) -> str:
        return f"{short(v)} req/s"

    def wrap(fn: Callable[[float], str]) -> Callable[[float], str]:
        return lambda v: "NaN" if math.isnan(v) else fn(v)

    return wrap({"s": seconds, "percentunit": percent, "reqps": per_second, "ops": per_second}.get(unit, short))


def _color(name: str) -> str:
    return COLORS.get(name, name)


def _override_colors(panel: dict[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    found = []
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") != "byRegexp":
            continue
        for prop in override.get("properties", []):
            if prop.get("id") == "color" and prop["value"].get("fixedColor"):
                found.append((re.compile(matcher["options"]), _color(prop["value"]["fixedColor"])))
    return found


def _series_color(name: str, index: int, overrides: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, color in overrides:
        if pattern.fullmatch(name):
            return color
    return PALETTE[index % len(PALETTE)]


def run_queries(prometheus: Prometheus, panel: dict[str, Any], window: Window) -> list[Result]:
    results = []
    for target in panel.get("targets", []):
        expr = window.substitute(target.get("expr", ""))
        result = Result(target.get("legendFormat", "__auto"))
        try:
            if target.get("instant"):
                result.series = prometheus.query(expr, window.end)
            else:
                result.series = prometheus.query_range(expr, window.start, window.end, window.step)
            if target.get("exemplar"):
                result.exemplars = prometheus.exemplars(expr, window.start, window.end)
        except PrometheusError as error:
            result.error = str(error)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------- drawing


def _style(ax: Axes, unit: str) -> None:
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=6, length=2)
    ax.grid(True, color=GRID, linewidth=0.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(unit)(v)))


def _time_axis(ax: Axes, window: Window) -> None:
    ax.set_xlim(_date(window.start), _date(window.end))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))  # type: ignore[no-untyped-call]


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _date(stamp: float) -> float:
    return float(mdates.date2num(datetime.fromtimestamp(stamp, UTC)))  # type: ignore[no-untyped-call]


def _message(ax: Axes, text: str, color: str = MUTED) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color=color, fontsize=8, wrap=True, transform=ax.transAxes)


def _legend(ax: Axes, names: list[tuple[str, str]]) -> None:
    if not names:
        return
    shown = names[:MAX_LEGEND]
    handles = [Line2D([0], [0], color=color, linewidth=2) for _name, color in shown]
    labels = [_shorten(name, 60) for name, _color in shown]
    if len(names) > MAX_LEGEND:
        handles.append(Line2D([0], [0], color=PANEL))
        labels.append(f"+{len(names) - MAX_LEGEND} more series")
    legend = ax.legend(
        handles,
        labels,
        loc="upper left",
        # Just below the time axis labels, whatever the plot's height: an offset in inches, not in axes fractions.
        bbox_to_anchor=(0.0, 0.0),
        bbox_transform=ax.transAxes + ScaledTranslation(0.0, -0.2, _figure(ax).dpi_scale_trans),
        ncol=2,
        fontsize=5.5,
        frameon=False,
        labelcolor=TEXT,
        handlelength=1.2,
        columnspacing=1.0,
        borderaxespad=0.0,
    )
    legend.set_in_layout(False)


def _figure(ax: Axes) -> Figure:
    figure = ax.get_figure(root=True)
    assert isinstance(figure, Figure)
    return figure


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw_timeseries(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    custom = defaults.get("custom", {})
    stacked = custom.get("stacking", {}).get("mode", "none") != "none"
    bars = custom.get("drawStyle") == "bars"
    overrides = _override_colors(panel)
    _style(ax, unit)
    _time_axis(ax, window)
    names: list[tuple[str, str]] = []
    lines: list[tuple[str, list[float], list[float]]] = []
    for result in results:
        for series in sorted(result.series, key=lambda s: legend_text(result.legend, s.labels)):
            lines.append((legend_text(result.legend, series.labels), series.times, series.values))
    if stacked and lines:
        grid = sorted({t for _name, times, _values in lines for t in times})
        base = [0.0] * len(grid)
        for index, (name, times, values) in enumerate(lines):
            by_time = dict(zip(times, values, strict=True))
            top = [
                b + (v if not math.isnan(v := by_time.get(t, 0.0)) else 0.0) for b, t in zip(base, grid, strict=True)
            ]
            color = _series_color(name, index, overrides)
            dates = [_date(t) for t in grid]
            ax.fill_between(dates, base, top, color=color, alpha=0.45, linewidth=0, step="post" if bars else None)
            ax.plot(dates, top, color=color, linewidth=0.8, drawstyle="steps-post" if bars else "default")
            names.append((name, color))
            base = top
    else:
        for index, (name, times, values) in enumerate(lines):
            color = _series_color(name, index, overrides)
            ax.plot(
                [_date(t) for t in times],
                values,
                color=color,
                linewidth=1.0,
                drawstyle="steps-post" if bars else "default",
            )
            names.append((name, color))
    _y_limits(ax, defaults, [v for _name, _times, values in lines for v in values if not math.isnan(v)])
    _legend(ax, names)


def _y_limits(ax: Axes, defaults: dict[str, Any], values: list[float]) -> None:
    """Grafana's axis rules: ``min``/``max`` are fixed ends; ``axisSoftMin`` is an end the data may go past."""
    soft_min = defaults.get("custom", {}).get("axisSoftMin")
    bottom = defaults.get("min")
    if bottom is None and soft_min is not None:
        bottom = min([soft_min, *values])
    top = defaults.get("max")
    if bottom is not None and top is not None:
        span = top - bottom
        ax.set_ylim(bottom, top + span * 0.02)
    elif bottom is not None:
        ax.set_ylim(bottom=bottom)
    elif top is not None:
        ax.set_ylim(top=top)


def draw_heatmap(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    """Bucket rates as a heatmap: one row per ``le`` bound, the cumulative buckets turned into per-bucket rates,
    with the exemplars (sampled requests carrying a trace id) as dots at their duration."""
    _style(ax, "short")
    _time_axis(ax, window)
    series = [s for result in results for s in result.series if "le" in s.labels]
    exemplars = [e for result in results for e in result.exemplars]
    bounds = sorted({_number(s.labels["le"]) for s in series})
    times = sorted({t for s in series for t in s.times})
    if not bounds or not times:
        _message(ax, "No data")
        return
    cumulative = {(_number(s.labels["le"]), t): v for s in series for t, v in zip(s.times, s.values, strict=True)}
    rows = []
    for i, bound in enumerate(bounds):
        below = bounds[i - 1] if i else None
        row = []
        for t in times:
            value = cumulative.get((bound, t), math.nan)
            if below is not None:
                value -= cumulative.get((below, t), 0.0)
            row.append(max(0.0, value) if not math.isnan(value) else math.nan)
        rows.append(row)
    # Rows are evenly spaced by bucket index (Grafana's default for le buckets), labelled with their bound.
    edges_x = [_date(t) for t in times] + [_date(times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1))]
    cmap = LinearSegmentedColormap.from_list("oranges", [PANEL, "#5c2c0b", COLORS["dark-orange"], "#ffd8b0"])
    ax.pcolormesh(edges_x, list(range(len(bounds) + 1)), rows, cmap=cmap, shading="flat")
    labels = [formatter("s")(b) if math.isfinite(b) else "+Inf" for b in bounds]
    step = max(1, len(bounds) // 8)
    ax.set_yticks([i + 0.5 for i in range(0, len(bounds), step)], labels[::step])
    ax.set_ylim(0, len(bounds))
    if exemplars:
        ax.scatter(
            [_date(e.time) for e in exemplars],
            [_bucket_position(e.value, bounds) for e in exemplars],
            s=7,
            color="#ff00ff",
            alpha=0.8,
            linewidths=0,
            zorder=3,
        )
    _legend(ax, [(f"{len(exemplars)} exemplars (trace ids)", "#ff00ff")] if exemplars else [])


def _bucket_position(value: float, bounds: list[float]) -> float:
    """Where ``value`` falls on the bucket-index axis: inside its bucket, proportionally between the bounds."""
    lower = 0.0
    for index, upper in enumerate(bounds):
        if value <= upper:
            if not math.isfinite(upper) or upper == lower:
                return index + 0.5
            return index + (value - lower) / (upper - lower)
        lower = upper
    return len(bounds) - 0.5


def draw_state_timeline(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    mapping: dict[str, tuple[str, str]] = {}
    for entry in defaults.get("mappings", []):
        for value, option in entry.get("options", {}).items():
            mapping[value] = (option.get("text", value), _color(option.get("color", "blue")))
    _style(ax, "short")
    _time_axis(ax, window)
    ax.grid(False)
    rows = [
        (legend_text(result.legend, s.labels), s)
        for result in results
        for s in sorted(result.series, key=lambda s: legend_text(result.legend, s.labels))
    ]
    if not rows:
        _message(ax, "No data")
        return
    shown = rows[:12]
    for index, (_name, series) in enumerate(shown):
        y = len(shown) - 1 - index
        for i, (stamp, value) in enumerate(zip(series.times, series.values, strict=True)):
            if math.isnan(value):
                continue
            end = series.times[i + 1] if i + 1 < len(series.times) else window.end
            _text, color = mapping.get(f"{value:g}", (f"{value:g}", PALETTE[0]))
            ax.broken_barh([(_date(stamp), _date(end) - _date(stamp))], (y + 0.1, 0.8), color=color, linewidth=0)
    # The series names inside their bands (Grafana puts them on the left; here the panel keeps its full width).
    for index, (name, _series) in enumerate(shown):
        ax.text(
            _date(window.start),
            len(shown) - 1 - index + 0.5,
            _shorten(name, 70),
            va="center",
            color=TEXT,
            fontsize=6,
            bbox={"facecolor": BACKGROUND, "alpha": 0.7, "edgecolor": "none", "pad": 1.5},
        )
    ax.set_yticks([])
    ax.set_ylim(0, len(shown))
    _legend(ax, [(text, color) for text, color in mapping.values()])


def draw_stat(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    fmt = formatter(defaults.get("unit", "short"))
    series = [(legend_text(r.legend, s.labels), s) for r in results for s in r.series]
    ax.set_axis_off()
    if not series:
        _message(ax, "No data")
        return
    name, first = series[0]
    values = [v for v in first.values if not math.isnan(v)]
    last = values[-1] if values else math.nan
    color = _stat_color(defaults, last)
    if len(first.times) > 1 and values:
        spark = ax.inset_axes((0.0, 0.0, 1.0, 0.45))
        spark.set_axis_off()
        spark.fill_between([_date(t) for t in first.times], first.values, color=color, alpha=0.25, linewidth=0)
        spark.plot([_date(t) for t in first.times], first.values, color=color, linewidth=0.8)
    ax.text(0.5, 0.62, fmt(last), ha="center", va="center", color=color, fontsize=16, weight="bold")
    if len(series) > 1:
        ax.text(0.5, 0.28, f"{name} (+{len(series) - 1} more)", ha="center", color=MUTED, fontsize=6)


def _stat_color(defaults: dict[str, Any], value: float) -> str:
    color = defaults.get("color", {})
    if color.get("mode") == "fixed":
        return _color(color.get("fixedColor", "blue"))
    steps = defaults.get("thresholds", {}).get("steps", [])
    chosen = "green"
    for step in steps:
        if step.get("value") is None or (not math.isnan(value) and value >= step["value"]):
            chosen = step["color"]
    return _color(chosen)


def draw_bargauge(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    fmt = formatter(defaults.get("unit", "short"))
    bars = [(legend_text(r.legend, s.labels), s.values[-1]) for r in results for s in r.series if s.values]
    bars = sorted(((n, v) for n, v in bars if not math.isnan(v)), key=lambda item: -item[1])[:10]
    _style(ax, defaults.get("unit", "short"))
    if not bars:
        _message(ax, "No data")
        return
    overrides = _override_colors(panel)
    fixed = _stat_color(defaults, 0.0)
    colors = [next((c for pattern, c in overrides if pattern.fullmatch(name)), fixed) for name, _v in bars]
    # Grafana's "name on top" layout: the name above a thin bar, the value at its end.
    positions = [index * 2.0 for index in range(len(bars))]
    ax.barh(positions, [v for _n, v in bars], height=0.9, color=colors, alpha=0.85)
    ax.set_yticks([])
    ax.set_ylim(len(bars) * 2.0 - 0.8, -1.6)
    top = max(v for _n, v in bars) or 1.0
    ax.set_xlim(0, top * 1.15)
    for position, (name, value) in zip(positions, bars, strict=True):
        ax.text(0, position - 0.65, _shorten(name, 90), va="bottom", color=TEXT, fontsize=6)
        ax.text(value, position, " " + fmt(value), va="center", color=TEXT, fontsize=6)
    ax.grid(True, axis="x", color=GRID, linewidth=0.5)
    ax.grid(False, axis="y")


def draw_table(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    hidden: set[str] = set()
    renamed: dict[str, str] = {}
    for transformation in panel.get("transformations", []):
        if transformation.get("id") == "organize":
            options = transformation.get("options", {})
            hidden |= {name for name, hide in options.get("excludeByName", {}).items() if hide}
            renamed |= options.get("renameByName", {})
    rows = [s for r in results for s in r.series]
    ax.set_axis_off()
    if not rows:
        _message(ax, "No data")
        return
    columns = sorted({k for s in rows for k in s.labels if k != "__name__"})
    show_value = "Value" not in hidden
    header = [*columns, *([renamed.get("Value", "Value")] if show_value else [])]
    fmt = formatter(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"))
    cells = [
        [_shorten(s.labels.get(c, ""), 40) for c in columns] + ([fmt(s.values[-1])] if show_value else [])
        for s in sorted(rows, key=lambda s: [s.labels.get(c, "") for c in columns])
    ][:12]
    table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    for (row, _col), cell in table.get_celld().items():
        cell.set_edgecolor(GRID)
        cell.set_facecolor("#22252b" if row == 0 else PANEL)
        cell.get_text().set_color(TEXT if row else MUTED)
        cell.set_height(0.085)


DRAW: dict[str, Callable[[Axes, dict[str, Any], list[Result], Window], None]] = {
    "timeseries": draw_timeseries,
    "heatmap": draw_heatmap,
    "state-timeline": draw_state_timeline,
    "stat": draw_stat,
    "bargauge": draw_bargauge,
    "table": draw_table,
}


def render_dashboard(prometheus: Prometheus, board: dict[str, Any], window: Window, out: Path) -> list[str]:
    """Draw ``board`` into ``out`` (PNG); return the query errors met (empty: every query answered)."""
    items = list(panels(board))
    height = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in items), default=1)
    header = 2  # grid rows for the dashboard's own title
    figure: Figure = plt.figure(figsize=(WIDTH_IN, (height + header) * UNIT_IN), dpi=DPI, facecolor=BACKGROUND)
    grid = GridSpec(height + header, 24, figure=figure, left=0.01, right=0.99, top=0.995, bottom=0.005, hspace=0.0)
    title = figure.add_subplot(grid[0:header, :])
    title.set_axis_off()
    stamp = datetime.fromtimestamp(window.end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    title.text(0.0, 0.65, board.get("title", board.get("uid", "")), color=TEXT, fontsize=14, weight="bold")
    title.text(
        0.0,
        0.15,
        f"last {window.minutes:g} min to {stamp} · all services, all routes · drawn by "
        "scripts/render_dashboards.py from the dashboard's own Prometheus queries (not a Grafana screenshot)",
        color=MUTED,
        fontsize=7,
    )
    errors: list[str] = []
    for panel in items:
        pos = panel["gridPos"]
        y, x, w, h = pos["y"] + header, pos["x"], pos["w"], pos["h"]
        frame = figure.add_subplot(grid[y : y + h, x : x + w])
        frame.set_xticks([])
        frame.set_yticks([])
        if panel.get("type") == "row":
            frame.set_axis_off()
            frame.text(0.0, 0.3, panel.get("title", ""), color=TEXT, fontsize=10, weight="bold")
            continue
        frame.set_facecolor(PANEL)
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(
            0.01,
            0.985,
            panel.get("title", ""),
            color=TEXT,
            fontsize=7.5,
            weight="bold",
            va="top",
            transform=frame.transAxes,
        )
        results = run_queries(prometheus, panel, window)
        failed = [r.error for r in results if r.error]
        errors += [f"{board.get('uid')} / {panel.get('title')}: {error}" for error in failed]
        inner = frame.inset_axes(_inner_box(panel, w, h))
        if failed:
            _message(inner, _shorten("query error: " + failed[0], 160), COLORS["red"])
            continue
        DRAW.get(panel.get("type", ""), draw_timeseries)(inner, panel, results, window)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, facecolor=BACKGROUND, dpi=DPI)
    plt.close(figure)
    return errors


def _inner_box(panel: dict[str, Any], w: int, h: int) -> tuple[float, float, float, float]:
    """The plot area inside a panel frame, in frame fractions: room for the title, the y labels and the legend."""
    height_in = h * UNIT_IN
    width_in = w / 24 * WIDTH_IN
    top = 0.3 / height_in
    kind = panel.get("type", "")
    if kind in ("stat", "table"):
        return (0.02, 0.04, 0.96, 1 - top - 0.06)
    left = (0.15 if kind in ("state-timeline", "bargauge") else 0.55) / width_in
    bottom = 0.25 / height_in
    if kind in ("timeseries", "state-timeline", "heatmap"):
        bottom += LEGEND_IN / height_in  # the legend under the plot
    return (left, bottom, 1 - left - 0.1 / width_in, 1 - top - bottom)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="directory for the PNGs")
    parser.add_argument("--minutes", type=float, default=5.0, help="how far back the panels look (default 5)")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS, help="directory of dashboard JSON files")
    parser.add_argument(
        "--rate-interval", default="30s", help="what $__rate_interval becomes (default 30s: 4+ scrapes at 5 s)"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    prometheus = Prometheus(args.prometheus)
    files = sorted(args.dashboards.glob("*.json"))
    if not files:
        print(f"error: no dashboards (*.json) in {args.dashboards}", file=sys.stderr)
        return 2
    try:
        prometheus.check()
    except (PrometheusUnreachable, PrometheusError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    end = time.time()
    # About 120 points per line, never finer than 1 s (Grafana's own step choice is similar).
    window = Window(end, args.minutes, max(1.0, round(args.minutes * 60 / 120)), args.rate_interval)
    failures: list[str] = []
    for path in files:
        board = json.loads(path.read_text())
        out = args.out / f"dashboard-{board['uid'].removeprefix('meshgate-')}.png"
        try:
            failures += render_dashboard(prometheus, board, window, out)
        except PrometheusUnreachable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(out)
    for failure in failures:
        print(f"query failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
