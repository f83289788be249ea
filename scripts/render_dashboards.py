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

The pieces live in ``scripts/dashboard_render/`` (reading the dashboards, the Prometheus client, the queries of a
panel, Grafana's look, one drawer per panel type); this file lays the panels out and is the command.

Exit status: 0 when every query answered, 1 when some query failed (its panel shows the error), 2 when Prometheus
cannot be reached at all (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dashboard_render.grafana import DASHBOARDS, dashboards, panels
from dashboard_render.prometheus import Prometheus, PrometheusError, PrometheusUnreachable
from dashboard_render.query import Window, run_queries

try:  # matplotlib is an optional dependency (the `docs` extra): say how to get it instead of a traceback
    from dashboard_render.draw import DRAW, draw_timeseries
    from dashboard_render.theme import BACKGROUND, COLORS, GRID, MUTED, PANEL, TEXT, message, shorten
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec
except ModuleNotFoundError as missing:
    if missing.name != "matplotlib" and not (missing.name or "").startswith("matplotlib."):
        raise
    sys.exit("error: matplotlib is not installed: pip install -e '.[docs]'")

__all__ = ["main", "render_dashboard"]

ROOT = Path(__file__).resolve().parent.parent
UNIT_IN = 0.36  # inches per Grafana grid row (30 px plus margins at 100 dpi)
WIDTH_IN = 18.0  # the dashboard's 24 columns
DPI = 100
LEGEND_IN = 0.62  # inches under a plot for its legend: four rows of two columns


def render_dashboard(prometheus: Prometheus, board: dict[str, Any], window: Window, out: Path) -> list[str]:
    """Draw ``board`` into ``out`` (PNG); return the query errors met (empty: every query answered)."""
    items = list(panels(board, rows=True))
    height = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in items), default=1)
    header = 2  # grid rows for the dashboard's own title
    # A bare Figure, not pyplot: no backend or global state; savefig picks the PNG writer itself.
    figure = Figure(figsize=(WIDTH_IN, (height + header) * UNIT_IN), dpi=DPI, facecolor=BACKGROUND)
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
            message(inner, shorten("query error: " + failed[0], 160), COLORS["red"])
            continue
        DRAW.get(panel.get("type", ""), draw_timeseries)(inner, panel, results, window)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, facecolor=BACKGROUND, dpi=DPI)
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
    boards = dashboards(args.dashboards)
    if not boards:
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
    for board in boards.values():
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
