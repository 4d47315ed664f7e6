"""Inline SVG for the console: the daily census as stacked bars, a patient's level stays as
bands over time. Server-rendered (no chart library, no script); every text is escaped. Each
chart has a title and a description for screen readers, and the pages show the same numbers
as a table beside it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

#: Colours with at least 3:1 contrast against white (WCAG 1.4.11), told apart by hue.
PALETTE = [
    "#0b5fa5",
    "#a14f00",
    "#0f7a55",
    "#8e3b7d",
    "#5a4bb4",
    "#b3261e",
    "#2f5f6f",
    "#6b6b00",
    "#7a3e1d",
    "#3c6e12",
]


def colour_index(levels: Sequence[str], level_order: Sequence[str]) -> dict[str, int]:
    """Each level's palette index, by its place in the policy: a level keeps its colour on
    every page (the legend's CSS classes `swatch-N` use the same indexes)."""
    place = {code: i for i, code in enumerate(level_order)}
    extra = sorted(set(levels) - set(place))
    place.update({code: len(level_order) + i for i, code in enumerate(extra)})
    return {level: place[level] % len(PALETTE) for level in levels}


def _attr(value: object) -> str:
    return str(escape(str(value)))


def daily_census_svg(
    days: Sequence[Mapping[str, Any]], level_order: Sequence[str], *, width: int = 900
) -> tuple[Markup, dict[str, int]]:
    """Stacked bars, one per day: patients per level at midnight UTC. Returns the SVG and the
    palette index of each level shown (for the legend)."""
    height, left, bottom, top = 260, 44, 28, 12
    present = {level for day in days for level in day["levels"]}
    order = [code for code in level_order if code in present]
    order += sorted(present - set(order))
    palette_index = colour_index(order, level_order)
    colours = {level: PALETTE[i] for level, i in palette_index.items()}
    peak = max((int(day["total"]) for day in days), default=0)
    scale_max = max(1, _nice(peak))
    plot_w, plot_h = width - left - 8, height - top - bottom
    step = plot_w / max(1, len(days))
    bar_w = max(1.0, step - 1)
    parts: list[str] = []
    first = days[0]["date"] if days else ""
    last = days[-1]["date"] if days else ""
    parts.append(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="census-chart-title census-chart-desc" '
        f'xmlns="http://www.w3.org/2000/svg">'
        f'<title id="census-chart-title">Daily census, {_attr(first)} to {_attr(last)}</title>'
        f'<desc id="census-chart-desc">Stacked bars: patients in care at midnight UTC each day, '
        f"by level; highest total {peak}. The table below the chart lists the same numbers."
        f"</desc>"
    )
    for i in range(5):
        value = scale_max * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{value:g}</text>"
        )
    for index, day in enumerate(days):
        x = left + index * step
        y = top + plot_h
        for level in order:
            n = int(day["levels"].get(level, 0))
            if not n:
                continue
            h = plot_h * n / scale_max
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colours[level]}"><title>{_attr(day["date"])}: {n} at level '
                f"{_attr(level)}</title></rect>"
            )
    for index, day in enumerate(days):
        if index % 15 == 0 or index == len(days) - 1:
            x = left + index * step + bar_w / 2
            anchor = "end" if index == len(days) - 1 else "middle"
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{height - 8}" text-anchor="{anchor}">'
                f"{_attr(str(day['date'])[5:])}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts)), palette_index


def _nice(value: int) -> int:
    """A round axis maximum at or above `value`."""
    for candidate in (4, 8, 12, 20, 40, 60, 80, 100, 200, 400, 600, 800, 1000):
        if value <= candidate:
            return candidate
    magnitude: int = 10 ** (len(str(value)) - 1)
    return (value // magnitude + 1) * magnitude


@dataclass(frozen=True)
class Stay:
    level: str
    site: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    voided: bool
    end_kind: str | None


def level_bands_svg(
    stays: Sequence[Stay], level_order: Sequence[str], now: dt.datetime, *, width: int = 900
) -> Markup:
    """One row per level (most intensive on top), a band per stay; voided stays are drawn
    hatched and struck through."""
    if not stays:
        return Markup("")
    rank = {code: i for i, code in enumerate(level_order)}
    levels = sorted({s.level for s in stays}, key=lambda c: (-rank.get(c, -1), c))
    colours = {level: PALETTE[i] for level, i in colour_index(levels, level_order).items()}
    start = min(s.started_at for s in stays)
    end = max([now, *(s.ended_at for s in stays if s.ended_at is not None)])
    span = max((end - start).total_seconds(), 3600.0)
    row_h, left, top = 30, 70, 8
    height = top + row_h * len(levels) + 26
    plot_w = width - left - 10

    def x_of(moment: dt.datetime) -> float:
        return left + plot_w * (moment - start).total_seconds() / span

    parts = [
        f'<svg class="chart bands" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="bands-title bands-desc" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="bands-title">Levels of care over time</title>'
        f'<desc id="bands-desc">One row per level, one band per stay from {start:%Y-%m-%d} to '
        f"{end:%Y-%m-%d}; voided stays are hatched and struck through. The stays table lists "
        f"the same.</desc>"
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" class="hatch"/>'
        "</pattern></defs>"
    ]
    for row, level in enumerate(levels):
        y = top + row * row_h
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - 10}" y1="{y + row_h - 2}" '
            f'y2="{y + row_h - 2}"/><text class="axis" x="{left - 8}" y="{y + row_h / 2 + 4}" '
            f'text-anchor="end">{_attr(level)}</text>'
        )
        for stay in (s for s in stays if s.level == level):
            x1 = x_of(stay.started_at)
            x2 = x_of(stay.ended_at or now)
            w = max(2.0, x2 - x1)
            until = f"{stay.ended_at:%Y-%m-%d}" if stay.ended_at else "now"
            label = f"{stay.level} at {stay.site}, {stay.started_at:%Y-%m-%d} to {until}" + (
                " (voided)" if stay.voided else ""
            )
            fill = "url(#hatch)" if stay.voided else colours[level]
            klass = "band voided" if stay.voided else "band"
            parts.append(
                f'<rect class="{klass}" x="{x1:.1f}" y="{y + 4}" width="{w:.1f}" '
                f'height="{row_h - 10}" fill="{fill}" stroke="{colours[level]}">'
                f"<title>{_attr(label)}</title></rect>"
            )
            if stay.voided:
                mid = y + 4 + (row_h - 10) / 2
                parts.append(
                    f'<line class="strike" x1="{x1:.1f}" x2="{x1 + w:.1f}" y1="{mid}" y2="{mid}"/>'
                )
    axis_y = top + row_h * len(levels) + 16
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        moment = start + dt.timedelta(seconds=span * fraction)
        anchor = {0.0: "start", 1.0: "end"}.get(fraction, "middle")
        parts.append(
            f'<text class="axis" x="{left + plot_w * fraction:.1f}" y="{axis_y}" '
            f'text-anchor="{anchor}">{moment:%Y-%m-%d}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
