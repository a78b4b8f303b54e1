"""Geometry for the small server-rendered SVG bar charts (usage per day)."""

from dataclasses import dataclass
from datetime import date
from decimal import Decimal


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: date
    value: Decimal


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    bars: list[Bar]
    baseline: float  # y of the zero line (usage can be negative: a delta may undo usage)
    maximum: Decimal
    minimum: Decimal
    total: Decimal


def bar_chart(points: list[tuple[date, Decimal]], *, width: int = 300, height: int = 60, gap: float = 1.0) -> BarChart:
    """Bars for daily totals, scaled so the largest magnitude fills the height."""
    values = [value for _day, value in points]
    top = max([Decimal(0), *values])
    bottom = min([Decimal(0), *values])
    span = (top - bottom) or Decimal(1)
    baseline = float(top / span) * height
    slot = width / max(len(points), 1)
    bars = []
    for index, (day, value) in enumerate(points):
        size = float(abs(value) / span) * height
        if value and size < 1:
            size = 1.0  # a small but non-zero day stays visible
        y = baseline - size if value >= 0 else baseline
        bars.append(
            Bar(
                x=round(index * slot, 2),
                y=round(y, 2),
                width=round(max(slot - gap, 1), 2),
                height=round(size, 2),
                day=day,
                value=value,
            )
        )
    return BarChart(
        width=width,
        height=height,
        bars=bars,
        baseline=round(baseline, 2),
        maximum=top,
        minimum=bottom,
        total=sum(values, Decimal(0)),
    )
