"""One panel of each type the dashboards use, drawn with matplotlib from its query results.

Each drawer takes ``(axes, panel JSON, results, window)``: time series (stacked where the panel stacks, bars where it
draws bars), heatmaps of histogram buckets with their exemplars, state timelines, stats, bar gauges and tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap

from .grafana import legend_text
from .prometheus import number
from .query import Result, Window
from .theme import (
    BACKGROUND,
    COLORS,
    GRID,
    MUTED,
    PALETTE,
    PANEL,
    TEXT,
    date_number,
    formatter,
    legend,
    message,
    named_color,
    override_colors,
    series_color,
    shorten,
    style,
    time_axis,
)

__all__ = [
    "DRAW",
    "draw_bargauge",
    "draw_heatmap",
    "draw_stat",
    "draw_state_timeline",
    "draw_table",
    "draw_timeseries",
]


def draw_timeseries(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    custom = defaults.get("custom", {})
    stacked = custom.get("stacking", {}).get("mode", "none") != "none"
    bars = custom.get("drawStyle") == "bars"
    overrides = override_colors(panel)
    style(ax, unit)
    time_axis(ax, window)
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
            color = series_color(name, index, overrides)
            dates = [date_number(t) for t in grid]
            ax.fill_between(dates, base, top, color=color, alpha=0.45, linewidth=0, step="post" if bars else None)
            ax.plot(dates, top, color=color, linewidth=0.8, drawstyle="steps-post" if bars else "default")
            names.append((name, color))
            base = top
    else:
        for index, (name, times, values) in enumerate(lines):
            color = series_color(name, index, overrides)
            ax.plot(
                [date_number(t) for t in times],
                values,
                color=color,
                linewidth=1.0,
                drawstyle="steps-post" if bars else "default",
            )
            names.append((name, color))
    _y_limits(ax, defaults, [v for _name, _times, values in lines for v in values if not math.isnan(v)])
    legend(ax, names)


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
    style(ax, "short")
    time_axis(ax, window)
    series = [s for result in results for s in result.series if "le" in s.labels]
    exemplars = [e for result in results for e in result.exemplars]
    bounds = sorted({number(s.labels["le"]) for s in series})
    times = sorted({t for s in series for t in s.times})
    if not bounds or not times:
        message(ax, "No data")
        return
    cumulative = {(number(s.labels["le"]), t): v for s in series for t, v in zip(s.times, s.values, strict=True)}
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
    after = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0)  # the last column's right edge
    edges_x = [date_number(t) for t in [*times, after]]
    cmap = LinearSegmentedColormap.from_list("oranges", [PANEL, "#5c2c0b", COLORS["dark-orange"], "#ffd8b0"])
    ax.pcolormesh(edges_x, list(range(len(bounds) + 1)), rows, cmap=cmap, shading="flat")
    labels = [formatter("s")(b) if math.isfinite(b) else "+Inf" for b in bounds]
    step = max(1, len(bounds) // 8)
    ax.set_yticks([i + 0.5 for i in range(0, len(bounds), step)], labels[::step])
    ax.set_ylim(0, len(bounds))
    if exemplars:
        ax.scatter(
            [date_number(e.time) for e in exemplars],
            [_bucket_position(e.value, bounds) for e in exemplars],
            s=7,
            color="#ff00ff",
            alpha=0.8,
            linewidths=0,
            zorder=3,
        )
    legend(ax, [(f"{len(exemplars)} exemplars (trace ids)", "#ff00ff")] if exemplars else [])


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
            mapping[value] = (option.get("text", value), named_color(option.get("color", "blue")))
    style(ax, "short")
    time_axis(ax, window)
    ax.grid(False)
    rows = [
        (legend_text(result.legend, s.labels), s)
        for result in results
        for s in sorted(result.series, key=lambda s: legend_text(result.legend, s.labels))
    ]
    if not rows:
        message(ax, "No data")
        return
    shown = rows[:12]
    for index, (_name, series) in enumerate(shown):
        y = len(shown) - 1 - index
        for i, (stamp, value) in enumerate(zip(series.times, series.values, strict=True)):
            if math.isnan(value):
                continue
            end = series.times[i + 1] if i + 1 < len(series.times) else window.end
            _text, color = mapping.get(f"{value:g}", (f"{value:g}", PALETTE[0]))
            ax.broken_barh(
                [(date_number(stamp), date_number(end) - date_number(stamp))], (y + 0.1, 0.8), color=color, linewidth=0
            )
    # The series names inside their bands (Grafana puts them on the left; here the panel keeps its full width).
    for index, (name, _series) in enumerate(shown):
        ax.text(
            date_number(window.start),
            len(shown) - 1 - index + 0.5,
            shorten(name, 70),
            va="center",
            color=TEXT,
            fontsize=6,
            bbox={"facecolor": BACKGROUND, "alpha": 0.7, "edgecolor": "none", "pad": 1.5},
        )
    ax.set_yticks([])
    ax.set_ylim(0, len(shown))
    legend(ax, [(text, color) for text, color in mapping.values()])


def draw_stat(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    fmt = formatter(defaults.get("unit", "short"))
    series = [(legend_text(r.legend, s.labels), s) for r in results for s in r.series]
    ax.set_axis_off()
    if not series:
        message(ax, "No data")
        return
    name, first = series[0]
    values = [v for v in first.values if not math.isnan(v)]
    last = values[-1] if values else math.nan
    color = _stat_color(defaults, last)
    if len(first.times) > 1 and values:
        spark = ax.inset_axes((0.0, 0.0, 1.0, 0.45))
        spark.set_axis_off()
        spark.fill_between([date_number(t) for t in first.times], first.values, color=color, alpha=0.25, linewidth=0)
        spark.plot([date_number(t) for t in first.times], first.values, color=color, linewidth=0.8)
    ax.text(0.5, 0.62, fmt(last), ha="center", va="center", color=color, fontsize=16, weight="bold")
    if len(series) > 1:
        ax.text(0.5, 0.28, f"{name} (+{len(series) - 1} more)", ha="center", color=MUTED, fontsize=6)


def _stat_color(defaults: dict[str, Any], value: float) -> str:
    color = defaults.get("color", {})
    if color.get("mode") == "fixed":
        return named_color(color.get("fixedColor", "blue"))
    steps = defaults.get("thresholds", {}).get("steps", [])
    chosen = "green"
    for step in steps:
        if step.get("value") is None or (not math.isnan(value) and value >= step["value"]):
            chosen = step["color"]
    return named_color(chosen)


def draw_bargauge(ax: Axes, panel: dict[str, Any], results: list[Result], window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    fmt = formatter(defaults.get("unit", "short"))
    bars = [(legend_text(r.legend, s.labels), s.values[-1]) for r in results for s in r.series if s.values]
    bars = sorted(((n, v) for n, v in bars if not math.isnan(v)), key=lambda item: -item[1])[:10]
    style(ax, defaults.get("unit", "short"))
    if not bars:
        message(ax, "No data")
        return
    overrides = override_colors(panel)
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
        ax.text(0, position - 0.65, shorten(name, 90), va="bottom", color=TEXT, fontsize=6)
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
        message(ax, "No data")
        return
    columns = sorted({k for s in rows for k in s.labels if k != "__name__"})
    show_value = "Value" not in hidden
    header = [*columns, *([renamed.get("Value", "Value")] if show_value else [])]
    fmt = formatter(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"))
    cells = [
        [shorten(s.labels.get(c, ""), 40) for c in columns] + ([fmt(s.values[-1])] if show_value else [])
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
