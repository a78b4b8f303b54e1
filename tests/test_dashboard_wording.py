"""Counts read as English: "1 user", "2 errors", "just now" (never "1 users", "user(s)",
"0 minutes ago")."""

import re
from datetime import timedelta

from django.utils import timezone

from dashboard.templatetags.kana_dashboard import ago
from users.models import EndUser

from .csv_helpers import csv_bytes


def box_labels(page: str) -> dict[str, str]:
    """{box id: "count label"} of the Segment page's three boxes."""
    found = re.findall(r'id="(box-[\w-]+)".*?class="count">(\d+)</div>\s*<div class="label">([^<]+)<', page, re.S)
    return {box: f"{count} {label}" for box, count, label in found}


def test_the_segment_boxes_agree_with_their_counts(member_client, segment):
    segment.identify("u1", {"email": "a@example.com"})
    segment.track("u1", "Report Exported", {})
    page = member_client.get("/").content.decode()
    assert box_labels(page) == {
        "box-unmapped": "1 event not mapped to features",
        "box-no-billing": "1 user not connected to a billing provider",
        "box-same-email": "0 users with the same email",
    }
    segment.identify("u2", {"email": "A@example.com"})
    segment.track("u2", "Report Exported", {})
    assert box_labels(member_client.get("/").content.decode()) == {
        "box-unmapped": "2 events not mapped to features",
        "box-no-billing": "2 users not connected to a billing provider",
        "box-same-email": "2 users with the same email",
    }


def test_an_event_received_seconds_ago_was_received_just_now(member_client, segment):
    segment.identify("u1", {})
    last_event = member_client.get("/").content.decode().split('id="last-event"')[1].split("</div>")[0]
    assert "just now" in last_event and "0 minutes" not in last_event


def test_ago_reads_naturally():
    now = timezone.now()
    assert ago(now) == "just now"
    assert ago(now - timedelta(seconds=59)) == "just now"
    assert ago(now - timedelta(minutes=1, seconds=5)) == "1\xa0minute ago"  # timesince's no-break space
    assert ago(now - timedelta(hours=5, minutes=20)) == "5\xa0hours ago"
    assert ago(None) == ""


def test_a_merge_of_one_user_says_user(member_client, segment, tenant):
    segment.identify("a", {"email": "jo@example.com"})
    segment.identify("b", {"email": "jo@example.com"})
    pks = list(EndUser.objects.for_workspace(tenant.workspace).values_list("pk", flat=True))
    duplicates = member_client.get("/duplicates/").content.decode()
    assert "· 2 users" in duplicates
    response = member_client.post("/duplicates/merge/", {"users": pks}, follow=True)
    message = [str(m) for m in response.context["messages"]][0]
    assert message.startswith("Merged 1 user into") and "(s)" not in message


def test_import_counts_say_error_or_errors(member_client, tenant, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path

    def counts_after(rows) -> str:
        upload = tmp_path / "users.csv"
        upload.write_bytes(csv_bytes(rows))
        with upload.open("rb") as file:
            page = member_client.post("/csv/import/", {"file": file}, follow=True).content.decode()
        return re.sub(
            r"\s+", " ", re.sub(r"<[^>]+>", " ", page.split('id="import-counts"')[1].split("</div>\n</div>")[0])
        )

    one = counts_after([{"user_id": "u1", "email": "not an email"}])
    assert "1 error" in one and "1 errors" not in one
    two = counts_after([{"user_id": "u1", "email": "bad"}, {"user_id": "u2", "billing_id": "no way!"}])
    assert "2 errors" in two
