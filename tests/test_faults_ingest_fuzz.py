"""Ingest fuzzing: generated Segment payloads, headers and encodings at every ingest endpoint.

Property-based (hypothesis), through Django's test client and the real database: whatever
arrives, the answer is never a 5xx, and a refused message writes nothing (no event, no user);
a batch writes exactly the messages it reports as accepted. Derandomized, so a run is
reproducible and the suite stays deterministic; the budget keeps it well under 30 seconds.
"""

import base64
import gzip
import json
import os

from django.db.models import Max
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.models import Event, Feature
from features.services import RuleDefinition, feature_create, rule_create
from users.models import EndUser

from .api_support import INGEST_PATHS

SEGMENT_KEYS = [
    "type",
    "userId",
    "anonymousId",
    "event",
    "name",
    "properties",
    "traits",
    "context",
    "integrations",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "previousId",
    "groupId",
    "writeKey",
    "batch",
]
TYPES = ["track", "identify", "page", "screen", "group", "alias", "Track", "", "other"]
# Values that have broken ingest or sit on a boundary: sizes of the usage column and of a
# float, "nobody" ids, dates past year 9999, NUL, lone surrogates, featureIds that exist.
SPECIAL = st.sampled_from(
    [
        0,
        -1,
        10**19,
        10**21,
        2**63,
        10**400,
        -(10**400),
        1e19,
        1e21,
        1.7e308,
        5e-324,
        -0.0,
        "1e999999999",
        "NaN",
        "anonymous",
        "null",
        "fz",
        "fuzz",
        "\x00",
        "\ud800",
        "a\udfff",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+14:00",
        "2024-02-30T00:00:00Z",
        "",
        " ",
        "x" * 300,
        True,
        None,
        [],
        {},
    ]
)
# Now and then a lone surrogate (JSON can escape one; no database stores one).
# Hypothesis favours "\x00", which PostgreSQL refuses (a 400 for the whole message): NUL and
# lone surrogates come from SPECIAL only, or they would drown everything else.
TEXT = st.text(st.characters(exclude_characters="\x00"), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | SPECIAL
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(TEXT | st.sampled_from(SEGMENT_KEYS), children, max_size=4)
    ),
    max_leaves=12,
)
# Amounts and compared values: plausible ones most of the time, the boundaries often.
NUMBERS = (
    st.integers(-5, 20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([10**19, 10**21, 10**400, 1e19, 1e20, 1e21, 1.7e308, "12", "1e20", "1e400", "abc", None, True])
)
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "featureId": st.sampled_from(["fz", "fz", "fz", "nope", "", None, 7]),
        "delta": NUMBERS,
        "n": NUMBERS,
        "amount": NUMBERS,
        "plan": st.fixed_dictionaries({}, optional={"tier": st.sampled_from(["pro", 1, None]) | JSON}),
        "items": st.lists(JSON, max_size=3),
        "a.b": st.sampled_from(["xx", "y"]) | SCALARS,
        "extra": JSON,
    },
)
ODD_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(TYPES) | SCALARS,
        "userId": st.sampled_from(["u1", "u2", "fuzz-user"]) | SCALARS,
        "previousId": st.sampled_from(["u1", "p1"]) | SCALARS,
        "groupId": st.sampled_from(["g1"]) | SCALARS,
        "event": st.sampled_from(["Fuzzed", "Seats"]) | SCALARS,
        "name": SCALARS,
        "messageId": st.sampled_from(["m1", "m2"]) | SCALARS,
        "properties": PROPERTIES | JSON,
        "traits": JSON,
        "context": JSON,
        "timestamp": SCALARS,
    },
)
# Mostly valid messages whose properties, traits and times are where the oddities are: these
# reach identity, the rules and the database.
TRAITS = st.fixed_dictionaries(
    {}, optional={"email": SCALARS | st.just("A@Example.com"), "name": SCALARS, "billingId": SCALARS}
)
TIMES = (
    st.datetimes(timezones=st.timezones() | st.none()).map(lambda t: t.isoformat())
    | st.datetimes().map(lambda t: t.isoformat())
    | SCALARS
)
VALID_MESSAGE = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "track", "track", "identify", "page", "screen", "group", "alias"]),
        "userId": st.sampled_from(["u1", "u2", "fuzz-user", 42]),
        "event": st.sampled_from(["Fuzzed", "Seats"]),
        "properties": PROPERTIES,
        "traits": TRAITS,
        "groupId": st.just("g1"),
        "previousId": st.sampled_from(["p1", "u2"]),
    },
    optional={
        "messageId": st.sampled_from(["m1", "m2", "m3"]) | st.text(max_size=101),
        "timestamp": TIMES,
        "originalTimestamp": TIMES,
        "sentAt": TIMES,
        "context": JSON,
    },
)
MESSAGE = VALID_MESSAGE | VALID_MESSAGE | ODD_MESSAGE
BODY = MESSAGE | st.fixed_dictionaries(
    # Up to 10 messages: runs of 8 or more go through COPY on PostgreSQL.
    {"batch": st.lists(MESSAGE, max_size=10) | st.lists(MESSAGE | JSON, max_size=3)},
    optional={"context": JSON, "integrations": JSON, "sentAt": SCALARS, "writeKey": SCALARS},
)


def _encode(value, how: str) -> bytes:
    if how == "ascii":
        return json.dumps(value, ensure_ascii=True).encode()
    # UTF-8 as sent, lone surrogates as the invalid bytes a careless client sends.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def requests(draw):
    """(path, body bytes, how to authenticate, gzip or not, Content-Type): mostly a valid
    envelope around odd messages, and now and then odd bytes, keys and encodings."""
    path = draw(st.sampled_from(INGEST_PATHS))
    if draw(st.integers(0, 9)) < 8:
        body = draw(BODY)
        if path in ("/v1/batch", "/v1/import") and "batch" not in body:
            body = {"batch": [body]}
        raw = _encode(body, draw(st.sampled_from(["ascii", "ascii", "utf8"])))
        auth = draw(st.sampled_from(["basic", "basic", "bearer", "bare", "writeKey"]))
        gzipped = draw(st.sampled_from([False, False, False, True]))
    else:
        raw = draw(
            st.sampled_from(["ascii", "utf8"]).flatmap(lambda how: (BODY | JSON).map(lambda v: _encode(v, how)))
            | st.binary(max_size=64)
            | st.just(b"")
            | st.just(b'{"userId": "u1", "event": "x", "properties": {"n": ' + b"9" * 5000 + b"}}")
        )
        auth = draw(
            st.sampled_from(["basic", "writeKey", "none", "wrong"]) | st.text(max_size=20).map(lambda t: "raw:" + t)
        )
        gzipped = draw(st.sampled_from([False, True, "broken"]))
    content_type = draw(st.sampled_from(["application/json", "application/json", "text/plain", ""]))
    return path, raw, auth, gzipped, content_type


def _headers(tenant, auth: str, gzipped) -> dict:
    headers = {}
    if auth == "basic":
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(f"{tenant.key}:".encode()).decode()
    elif auth == "bearer":
        headers["HTTP_AUTHORIZATION"] = f"Bearer {tenant.key}"
    elif auth == "bare":
        headers["HTTP_AUTHORIZATION"] = tenant.key
    elif auth == "wrong":
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(b"prv_live_nope:").decode()
    elif auth.startswith("raw:"):
        # What WSGI would hand over: latin-1 text (non-latin-1 characters cannot arrive).
        headers["HTTP_AUTHORIZATION"] = auth[4:].encode("utf-8", "replace").decode("latin-1")
    if gzipped:
        headers["HTTP_CONTENT_ENCODING"] = "gzip"
    return headers


def _with_write_key(raw: bytes, tenant) -> bytes:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return raw
    if isinstance(body, dict):
        body["writeKey"] = tenant.key
        return _encode(body, "ascii")
    return raw


def _setup(tenant) -> None:
    """A feature named by featureId and rules with every kind of condition (once per test)."""
    if Feature.objects.for_workspace(tenant.workspace).exists():
        return
    feature_create(workspace=tenant.workspace, key="fz")
    feature_create(workspace=tenant.workspace, key="seats")
    conditions = [
        {"property": "n", "operator": "gt", "value": 5},
        {"property": "plan.tier", "operator": "in", "value": ["pro", 1, None]},
        {"property": "items.0", "operator": "exists"},
    ]
    definitions = [
        RuleDefinition(name="fuzz", feature_key="seats", conditions=conditions, amount_property="amount"),
        RuleDefinition(
            name="fuzz2",
            feature_key="fz",
            event_name="Seats",
            conditions=[{"property": "a.b", "operator": "contains", "value": "x"}],
        ),
    ]
    for definition in definitions:
        rule_create(workspace=tenant.workspace, definition=definition)


@settings(
    # KANA_FUZZ_EXAMPLES=5000 KANA_FUZZ_RANDOM=1 for a longer hunt with fresh inputs.
    max_examples=int(os.environ.get("KANA_FUZZ_EXAMPLES", 250)),
    deadline=None,
    database=None,
    derandomize=os.environ.get("KANA_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests())
def test_ingest_never_answers_5xx_and_a_refused_message_writes_nothing(tenant, request):
    _setup(tenant)
    path, raw, auth, gzipped, content_type = request
    if auth == "writeKey":
        raw = _with_write_key(raw, tenant)
    if gzipped is True:
        raw = gzip.compress(raw)
    elif gzipped == "broken":
        raw = b"\x1f\x8b" + raw
    events_before = Event.objects.count()
    last_event = Event.objects.aggregate(last=Max("id"))["last"] or 0
    users_before = EndUser.objects.count()

    # generic(): the body goes out as these bytes, whatever charset the Content-Type names.
    response = Client(raise_request_exception=False).generic(
        "POST", path, raw, content_type=content_type, **_headers(tenant, auth, gzipped)
    )

    assert response.status_code < 500, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    written = Event.objects.count() - events_before
    if response.status_code != 200:
        assert body["code"] and body["message"]
        assert written == 0, body
        assert EndUser.objects.count() == users_before, body
    elif path in ("/v1/batch", "/v1/import"):
        assert written == body["accepted"], body
        assert all(set(item) >= {"index", "code", "message"} for item in body["rejected"])
    else:
        assert written == (0 if body["status"] == "duplicate" else 1), body
    # Whatever was written belongs to the key's workspace.
    assert not Event.objects.filter(id__gt=last_event).exclude(workspace=tenant.workspace).exists()
