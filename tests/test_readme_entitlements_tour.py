"""The README tour's entitlement commands (a package, a subscription, a check, a consume), run
as written through the API, answer what the README shows."""

import json
import re
import shlex
from datetime import UTC, datetime

from django.test import Client

from .api_support import feature
from .conftest import SegmentClient
from .test_readme_commands import ROOT


def tour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    body = text.split("Then give `u-123` a plan", 1)[1]
    block = re.search(r"```sh\n(.*?)```", body, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("curl")]


def run_curl(words: list[str], key: str):
    url = next(w for w in words if w.startswith("http://"))
    path = url.split("8000", 1)[1]
    body = words[words.index("-d") + 1] if "-d" in words else None
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    client = Client()
    if body is None:
        return client.get(path, **auth)
    return client.post(path, body, content_type="application/json", **auth)


def test_the_tour_gives_a_plan_checks_and_consumes(tenant):
    # As in the tour: the message was tracked before the plan started, so it is not counted.
    feature(tenant, "messages")
    sent = SegmentClient(tenant).track(
        "u-123", "Message Sent", {"featureId": "messages", "delta": 1}, timestamp=datetime.now(UTC).isoformat()
    )
    assert sent.status_code == 200
    answers = [run_curl(words, tenant.key) for words in tour_commands()]

    assert [a.status_code for a in answers] == [201, 201, 200, 200], [a.content for a in answers]
    check, consume = answers[2].json(), answers[3].json()
    assert (check["access"], check["reason"]) == (True, "within_limit")
    assert {k: check["consumption"][k] for k in ("used", "budget", "remaining")} == {
        "used": 0,
        "budget": 100,
        "remaining": 100,
    }
    assert (consume["access"], consume["recorded"], consume["consumption"]["used"]) == (True, True, 1)
    assert json.loads(run_curl(tour_commands()[3], tenant.key).content) == consume  # the same key: the first answer
