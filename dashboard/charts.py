"""Geometry for the small server-rendered SVG bar charts (usage per day), with their axes.

The y axis runs from a round number at or above the largest day down to zero (or a round
number at or below the smallest, as usage can be negative: a delta may undo usage); a zero
day sits on the zero line, and so does a series of zeros, at the bottom. The x axis labels
a day a week, counted back from the last (today).
"""

import math
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

# Room around the plot for the axis labels (SVG user units, ~px).
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 34, 6, 6, 18
X_LABEL_EVERY_DAYS = 7


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: date
    value: Decimal


@dataclass(frozen=True)
class Tick:
    position: float  # y of a value tick, x of a day tick
    label: str
    anchor: str = "middle"  # SVG text-anchor of a day label


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    left: float  # the plot area inside the axes
    right: float
    top: float
    bottom: float
    bars: list[Bar]
    baseline: float  # y of the zero line
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    maximum: Decimal
    minimum: Decimal
    total: Decimal

    @property
    def is_empty(self) -> bool:
        return not any(bar.value for bar in self.bars)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above ``value`` (0 for 0)."""
    if value <= 0:
        return 0.0
    base = 10.0 ** math.floor(math.log10(value))
    return next(step * base for step in (1, 2, 2.5, 5, 10) if value <= step * base * (1 + 1e-9))


def short_number(value: float) -> str:
    """An axis label: ``0``, ``2.5``, ``40``, ``1.2k``, ``3M``."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def bar_chart(points: list[tuple[date, Decimal]], *, width: int = 320, height: int = 110, gap: float = 1.0) -> BarChart:
    """Bars for daily totals (oldest first), on axes scaled to round numbers."""
    values = [value for _day, value in points]
    largest = max([Decimal(0), *values])
    smallest = min([Decimal(0), *values])
    top_value = nice_ceiling(float(largest))
    bottom_value = -nice_ceiling(float(-smallest))
    span = top_value - bottom_value  # 0 for a series of zeros: everything on the bottom line
    left, right, top, bottom = PAD_LEFT, width - PAD_RIGHT, PAD_TOP, height - PAD_BOTTOM

    def y_of(value: float) -> float:
        return top + (top_value - value) / span * (bottom - top) if span else float(bottom)

    baseline = y_of(0.0)
    slot = (right - left) / max(len(points), 1)
    bars = []
    for index, (day, value) in enumerate(points):
        size = abs(float(value)) / span * (bottom - top) if span else 0.0
        if value and size < 1:
            size = 1.0  # a small but non-zero day stays visible
        bars.append(
            Bar(
                x=round(left + index * slot + gap / 2, 2),
                y=round(baseline - size if value >= 0 else baseline, 2),
                width=round(max(slot - gap, 1), 2),
                height=round(size, 2),
                day=day,
                value=value,
            )
        )
    # No half-way tick between whole numbers for whole-number usage (a BINARY feature's 0.5).
    whole = all(value == value.to_integral_value() for value in values)
    middle = top_value / 2 if not whole or float(top_value / 2).is_integer() else 0.0
    y_values = [v for v in (top_value, middle) if v] + [0.0] + ([bottom_value] if bottom_value else [])
    y_ticks = [Tick(round(y_of(v), 2), short_number(v)) for v in y_values]
    x_ticks = [
        Tick(round(left + (index + 0.5) * slot, 2), day_label(points[index][0]))
        for index in reversed(range(len(points) - 1, -1, -X_LABEL_EVERY_DAYS))
    ]
    if x_ticks:  # the last label ends at the plot's edge rather than overflowing it
        x_ticks[-1] = Tick(round(right, 2), x_ticks[-1].label, anchor="end")
    return BarChart(
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        bars=bars,
        baseline=round(baseline, 2),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        maximum=largest,
        minimum=smallest,
        total=sum(values, Decimal(0)),
    )
