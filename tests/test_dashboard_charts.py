"""The usage charts on a user's page: dated x axis, y axis with values, zero at the bottom."""

import re
from datetime import UTC, date, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from dashboard.charts import bar_chart, nice_ceiling, short_number
from features.services import feature_create
from users.models import EndUser

DAYS = [date(2024, 1, 1) + timedelta(days=n) for n in range(30)]


def series(*values) -> list[tuple[date, Decimal]]:
    padded = [Decimal(0)] * (len(DAYS) - len(values)) + [Decimal(v) for v in values]
    return list(zip(DAYS, padded, strict=True))


def test_a_series_of_zeros_sits_on_the_bottom_line():
    chart = bar_chart(series())
    assert chart.baseline == chart.bottom  # not at the top, where it used to be drawn
    assert all(bar.height == 0 and bar.y == chart.bottom for bar in chart.bars)
    assert [(t.position, t.label) for t in chart.y_ticks] == [(chart.bottom, "0")]
    assert chart.is_empty


def test_the_y_axis_goes_up_to_a_round_number_and_labels_it():
    chart = bar_chart(series(18, 0, 10))
    assert [t.label for t in chart.y_ticks] == ["20", "10", "0"]
    top, middle, zero = (t.position for t in chart.y_ticks)
    assert top == chart.top and zero == chart.bottom == chart.baseline
    ten = chart.bars[-1]
    assert ten.height == pytest.approx((chart.bottom - chart.top) / 2, abs=0.01)
    assert ten.y == pytest.approx(middle, abs=0.01)


def test_negative_usage_hangs_below_the_zero_line():
    chart = bar_chart(series(4, -2))
    assert [t.label for t in chart.y_ticks] == ["5", "0", "-2"]  # no 2.5 for whole numbers
    assert chart.top < chart.baseline < chart.bottom
    up, down = chart.bars[-2:]
    assert up.y + up.height == pytest.approx(chart.baseline, abs=0.01)
    assert down.y == chart.baseline and down.height > 0


def test_the_x_axis_labels_a_day_a_week_up_to_the_last_one():
    chart = bar_chart(series(1))
    assert [t.label for t in chart.x_ticks] == ["Jan 2", "Jan 9", "Jan 16", "Jan 23", "Jan 30"]
    assert chart.x_ticks[-1].position == chart.right and chart.x_ticks[-1].anchor == "end"
    assert all(chart.left < t.position <= chart.right for t in chart.x_ticks)


def test_fractional_usage_gets_a_half_way_tick_and_whole_usage_a_whole_one():
    assert [t.label for t in bar_chart(series("0.4", 1)).y_ticks] == ["1", "0.5", "0"]
    assert [t.label for t in bar_chart(series(1)).y_ticks] == ["1", "0"]  # a BINARY feature
    assert [t.label for t in bar_chart(series(7)).y_ticks] == ["10", "5", "0"]


def test_a_tiny_day_stays_visible():
    chart = bar_chart(series(1000, Decimal("0.001")))
    assert chart.bars[-1].height == 1.0


@pytest.mark.parametrize("value, nice", [(0, 0), (0.3, 0.5), (1, 1), (3, 5), (4, 5), (18, 20), (22, 25), (1000, 1000)])
def test_nice_ceiling(value, nice):
    assert nice_ceiling(value) == pytest.approx(nice)


@pytest.mark.parametrize("value, label", [(0, "0"), (2.5, "2.5"), (40, "40"), (1200, "1.2k"), (-3e6, "-3M")])
def test_short_number(value, label):
    assert short_number(value) == label


def test_the_user_page_draws_both_axes(member_client, segment, tenant):
    feature_create(workspace=tenant.workspace, key="exports")
    feature_create(workspace=tenant.workspace, key="seats")
    today = timezone.now().astimezone(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    segment.track("u1", "Export", {"featureId": "exports", "delta": 7}, timestamp=today.isoformat())
    user = EndUser.objects.get(workspace=tenant.workspace, user_id="u1")

    response = member_client.get(f"/users/{user.pk}/")
    page = response.content.decode()
    exports, seats = (row["chart"] for row in response.context["usage"])
    assert seats.baseline == seats.bottom and exports.baseline == exports.bottom
    assert page.count('class="tick x-tick"') == 10  # five dates under each chart
    assert f">{today:%b} {today.day}</text>" in page  # today, the last label
    assert ">10</text>" in page and ">5</text>" in page  # exports: 7 on a 0..10 axis
    assert "no usage in these 30 days" in page  # seats
    baselines = re.findall(r'class="axis baseline" x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)"', page)
    assert [float(y) for y in baselines] == [float(exports.bottom), float(seats.bottom)]
