"""Grafana's look in matplotlib: the dark theme's colours, value units, time axes, legends and panel messages.

The PNGs stand for the dashboards, so they read like them: same palette, same unit formatting, the legend under the
plot, "No data" where Grafana would say it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import ScaledTranslation

from .query import Window

__all__ = [
    "BACKGROUND",
    "COLORS",
    "GRID",
    "MUTED",
    "PALETTE",
    "PANEL",
    "TEXT",
    "named_color",
    "date_number",
    "formatter",
    "legend",
    "message",
    "override_colors",
    "series_color",
    "shorten",
    "style",
    "time_axis",
]

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
MAX_LEGEND = 7  # series names under a plot; the rest is counted ("+N more series")

Overrides = list[tuple[re.Pattern[str], str]]


def formatter(unit: str) -> Callable[[float], str]:
    """A value as Grafana prints it in ``unit``: the few units the dashboards use, and ``suffix:<text>``."""

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

    def suffixed(v: float) -> str:
        return short(v) + unit.removeprefix("suffix:")

    units = {"s": seconds, "percentunit": percent, "reqps": per_second, "ops": per_second}
    chosen = suffixed if unit.startswith("suffix:") else units.get(unit, short)
    return lambda v: "NaN" if math.isnan(v) else chosen(v)


def named_color(name: str) -> str:
    """A Grafana colour name (``green``, ``dark-orange``) as hex; anything else is taken as a colour already."""
    return COLORS.get(name, name)


def override_colors(panel: dict[str, Any]) -> Overrides:
    """The panel's fixed colours by series-name regex (``byRegexp`` overrides), in order."""
    found = []
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") != "byRegexp":
            continue
        for prop in override.get("properties", []):
            if prop.get("id") == "color" and prop["value"].get("fixedColor"):
                found.append((re.compile(matcher["options"]), named_color(prop["value"]["fixedColor"])))
    return found


def series_color(name: str, index: int, overrides: Overrides) -> str:
    for pattern, fixed in overrides:
        if pattern.fullmatch(name):
            return fixed
    return PALETTE[index % len(PALETTE)]


def style(ax: Axes, unit: str) -> None:
    """A plot area in the panel's colours, its y axis in ``unit``."""
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=6, length=2)
    ax.grid(True, color=GRID, linewidth=0.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(unit)(v)))


def time_axis(ax: Axes, window: Window) -> None:
    ax.set_xlim(date_number(window.start), date_number(window.end))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))  # type: ignore[no-untyped-call]


def date_number(stamp: float) -> float:
    """Unix time as matplotlib's date number (what a time axis plots)."""
    return float(mdates.date2num(datetime.fromtimestamp(stamp, UTC)))  # type: ignore[no-untyped-call]


def message(ax: Axes, text: str, tint: str = MUTED) -> None:
    """Text instead of a plot: "No data", or the error a query met."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color=tint, fontsize=8, wrap=True, transform=ax.transAxes)


def legend(ax: Axes, names: list[tuple[str, str]]) -> None:
    """``(name, colour)`` pairs in two columns under the plot, at most ``MAX_LEGEND`` of them."""
    if not names:
        return
    shown = names[:MAX_LEGEND]
    handles = [Line2D([0], [0], color=tint, linewidth=2) for _name, tint in shown]
    labels = [shorten(name, 60) for name, _tint in shown]
    if len(names) > MAX_LEGEND:
        handles.append(Line2D([0], [0], color=PANEL))
        labels.append(f"+{len(names) - MAX_LEGEND} more series")
    drawn = ax.legend(
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
    drawn.set_in_layout(False)


def _figure(ax: Axes) -> Figure:
    figure = ax.get_figure(root=True)
    assert isinstance(figure, Figure)
    return figure


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
