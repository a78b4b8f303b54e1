"""Issue 15, all of schemathesis's checks: what the schema states is what the code does.

Requests the API accepted though the schema forbade them (a page_size of 2.5, an empty
format, a non-string writeKey, a non-object context on a track, an invalid batch-level time),
requests it refused though the schema allowed them (a rule change that a rule's own state
refuses answered 400, not 409; an existing feature id, an unknown feature or user answered 400),
and the patterns the schema now states, checked against the code that enforces them.
"""

import re
import sys

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from api.serializers import BILLING_ID_PATTERN, EMAIL_PATTERN, FEATURE_ID, FEATURE_ID_PATTERN
from features.models import MappingRule
from features.services import _FEATURE_KEY
from kana.openapi import NOT_BLANK_TEXT_PATTERN, PYTHON_SPACE, TEXT_PATTERN
from segment_ingest.schema import SEGMENT_ID
from tests.api_support import ApiClient, assert_error, feature, identify, rule
from users.identifiers import NOBODY_IDS, clean_identifier
from users.models import EndUser
from users.profile import billing_provider_for, is_valid_email

# Python's whitespace (what str.strip() removes), every code point of it.
PYTHON_WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


def matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern.removeprefix("^").removesuffix("$"), text) is not None


def test_the_whitespace_class_is_python_s():
    assert re.fullmatch(f"[{PYTHON_SPACE}]+", PYTHON_WHITESPACE)
    assert not any(re.fullmatch(f"[{PYTHON_SPACE}]", chr(c)) for c in range(0x3001) if not chr(c).isspace())


@pytest.mark.parametrize("text", ["a", " a ", "\x1c", " ", "\u3000x", "", "a\x00", "\ufeff"])
def test_the_text_patterns_say_what_a_trimming_char_field_accepts(text):
    assert matches(TEXT_PATTERN, text) == ("\x00" not in text)
    assert matches(NOT_BLANK_TEXT_PATTERN, text) == ("\x00" not in text and bool(text.strip()))


@pytest.mark.parametrize("key", ["exports", " exports ", "a" * 100, "a" * 101, "has spaces", "é", ""])
def test_the_feature_id_pattern_is_the_service_s(key):
    assert FEATURE_ID == _FEATURE_KEY.pattern.strip("^$")
    assert matches(FEATURE_ID_PATTERN, key) == bool(_FEATURE_KEY.match(key.strip()))


@pytest.mark.parametrize("email", ["a@example.com", " A.b+c@sub.example.org ", "a@b", "a@@example.com", ""])
def test_emails_the_pattern_allows_are_valid_and_blank_clears(email):
    if matches(EMAIL_PATTERN, email):
        assert not email.strip() or is_valid_email(email.strip())


@pytest.mark.parametrize("billing_id", ["cus_L1", "chargebee-9", "has space", "x" * 51, ""])
def test_billing_ids_the_pattern_allows_have_a_provider(billing_id):
    if matches(BILLING_ID_PATTERN, billing_id) and billing_id.strip():
        assert billing_provider_for(billing_id.strip())


def test_the_nobody_ids_pattern_is_the_identifier_rules():
    string_branch = SEGMENT_ID["anyOf"][0]
    for nobody in NOBODY_IDS:
        for spelled in (nobody, nobody.upper(), f" {nobody.title()} "):
            assert matches(string_branch["not"]["pattern"], spelled)
            assert clean_identifier(spelled, "userId") is None
    for someone in ("u1", "00", "nullable", "-12"):
        assert not matches(string_branch["not"]["pattern"], someone)
        assert clean_identifier(someone, "userId") == someone


@pytest.mark.parametrize("page_size", ["2.5", "0", "501", "", "x", "null"])
def test_a_page_size_that_is_not_1_to_500_is_refused(tenant, page_size):
    identify(tenant, "u1")
    assert_error(ApiClient(tenant).get("users", {"page_size": page_size}), 400, "invalid_request", "page_size")


def test_page_sizes_1_to_500_are_used(tenant):
    for n in range(3):
        identify(tenant, f"u{n}")
    api = ApiClient(tenant)
    assert len(api.get("users", {"page_size": "2"}).json()["results"]) == 2
    assert len(api.get("users", {"page_size": "500"}).json()["results"]) == 3


def test_the_export_refuses_an_empty_format(tenant):
    assert_error(ApiClient(tenant).get("users/export", {"format": ""}), 400, "invalid_request", "format")


def test_an_import_may_send_the_csv_as_the_part_s_text(tenant):
    api = ApiClient(tenant)
    response = api.client.post("/api/v1/users/import", {"file": "user_id,email\nu1,a@example.com\n"}, **api._headers())
    assert response.status_code in (200, 202), response.content
    as_file = SimpleUploadedFile("u.csv", b"user_id,email\nu2,b@example.com\n", content_type="text/csv")
    assert api.client.post("/api/v1/users/import", {"file": as_file}, **api._headers()).status_code in (200, 202)


def test_an_end_before_the_start_is_an_empty_range(tenant):
    feature(tenant, "exports")
    api = ApiClient(tenant)
    response = api.get("usage", {"start": "2025-02-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"})
    assert response.status_code == 200 and response.json()["results"] == []


def test_a_rule_change_that_leaves_neither_event_nor_condition_is_refused(tenant):
    feature(tenant, "exports")
    by_event = rule(tenant, "exports", "Exported")
    api = ApiClient(tenant)
    # Invalid as sent, whatever the rule: 400.
    assert_error(api.patch(f"rules/{by_event.pk}", {"event": None, "conditions": []}), 400, "invalid_rule")
    # Clearing the event of a rule that has no condition: the rule's state refuses it, 409.
    assert_error(api.patch(f"rules/{by_event.pk}", {"event": ""}), 409, "invalid_rule", "conditions")
    assert MappingRule.objects.get(pk=by_event.pk).event_name == "Exported"
    with_condition = api.patch(f"rules/{by_event.pk}", {"conditions": [{"property": "a", "operator": "exists"}]})
    assert with_condition.status_code == 200, with_condition.content
    assert api.patch(f"rules/{by_event.pk}", {"event": None}).status_code == 200


def test_conflicts_and_unknown_references_are_409_and_404(tenant):
    feature(tenant, "exports")
    api = ApiClient(tenant)
    assert_error(api.post("features", {"id": "exports"}), 409, "feature_exists", "id")
    assert_error(api.post("rules", {"name": "r", "feature": "nope", "event": "E"}), 404, "unknown_feature", "feature")
    user = identify(tenant, "u1")
    assert_error(api.post("users/merge", {"user_ids": [user.pk, 10**9]}), 404, "unknown_user", "user_ids")


@pytest.mark.parametrize(
    "path,body,code,field",
    [
        ("/v1/track", {"userId": "u1", "event": "E", "writeKey": 5}, "invalid_type", "writeKey"),
        ("/v1/track", {"userId": "u1", "event": "E", "context": "web"}, "invalid_type", "context"),
        ("/v1/group", {"userId": "u1", "groupId": "g", "integrations": []}, "invalid_type", "integrations"),
        ("/v1/page", {"userId": "u1", "name": 5}, "invalid_type", "name"),
        (
            "/v1/batch",
            {"batch": [{"type": "track", "userId": "u1", "event": "E"}], "writeKey": 1},
            "invalid_type",
            "writeKey",
        ),
        (
            "/v1/batch",
            {
                "batch": [{"type": "track", "userId": "u1", "event": "E", "sentAt": "2025-01-01T00:00:00Z"}],
                "sentAt": "yesterday",
            },
            "invalid_timestamp",
            "sentAt",
        ),
        ("/v1/batch", {"batch": [], "context": 3}, "invalid_type", "context"),
    ],
)
def test_segment_fields_of_the_wrong_type_are_refused(segment, path, body, code, field):
    response = segment.post(path, body)
    assert response.status_code == 400, response.content
    assert (response.json()["code"], response.json().get("field")) == (code, field)


def test_a_page_s_properties_name_is_a_property_like_any_other(segment, tenant):
    response = segment.post("/v1/page", {"userId": "u1", "properties": {"name": 5}})
    assert response.status_code == 200, response.content
    named = segment.post("/v1/page", {"userId": "u1", "properties": {"name": "Pricing"}})
    assert named.status_code == 200
    assert EndUser.objects.filter(workspace=tenant.workspace, user_id="u1").exists()


def test_the_write_key_is_not_stored_with_the_event(segment, tenant):
    from features.models import Event

    segment.post("/v1/track", {"userId": "u1", "event": "E", "writeKey": tenant.key})
    event = Event.objects.get(workspace=tenant.workspace)
    assert "writeKey" not in event.payload
