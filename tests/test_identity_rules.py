"""Identity rules beyond the ten published cases (SPEC §3-§5), through the real endpoints.

Emails, "nobody" identifiers, message order, replays, merges and their ledger, alias, group,
billing ids, Engage audiences and the dashboard flags.
"""

from decimal import Decimal

import pytest

from features.models import Event, EventStatus, Usage
from features.services import feature_create
from users.models import BillingProvider, EndUser, Group, GroupMembership, MergeReason, MergeRecord
from users.services import merge_users

from .identity_support import (
    all_users,
    at,
    bare_user,
    counts,
    flags,
    identities_of,
    iso,
    ok,
    set_email,
    user_for,
)

X = "x@example.com"

# --- Emails ----------------------------------------------------------------------------


def test_emails_match_ignoring_case_and_surrounding_spaces(segment, tenant):
    bare = bare_user(tenant, "Ann@Example.com")

    ok(segment.identify("1", {"email": "  ann@EXAMPLE.com  "}))

    [user] = all_users(tenant)
    assert user.pk == bare.pk and user.user_id == "1"  # claimed: the same email
    assert user.email == "ann@EXAMPLE.com"  # stored as sent, trimmed
    ok(segment.identify("2", {"email": "ANN@example.COM"}))
    assert "same_email" in flags(user) and "same_email" in flags(user_for(tenant, "2"))


def test_two_bare_users_with_the_same_email_are_flagged_and_never_merged(segment, tenant):
    first = bare_user(tenant, X)
    second = set_email(bare_user(tenant, "other@example.com"), X)

    body = ok(segment.identify("1", {"email": X}))

    assert len(all_users(tenant)) == 3
    created = user_for(tenant, "1")
    assert created.pk not in (first.pk, second.pk)
    assert EndUser.objects.filter(pk__in=[first.pk, second.pk], user_id__isnull=True).count() == 2
    assert not MergeRecord.objects.exists()
    assert all("same_email" in flags(u) for u in all_users(tenant))
    assert [w["code"] for w in body["warnings"]] == ["ambiguous_email_match"]


def test_an_invalid_email_is_not_stored_and_the_rest_is_applied(segment, tenant):
    body = ok(segment.identify("1", {"email": "not an email", "name": "Ann"}))

    user = user_for(tenant, "1")
    assert (user.name, user.email) == ("Ann", "")
    assert [w["code"] for w in body["warnings"]] == ["invalid_email"]


# --- Identifiers that mean "nobody" ----------------------------------------------------

NOBODY = ["", "  ", "null", "undefined", "None", "NaN", "0", "-1", "anonymous", "Guest", "[object Object]"]
NOBODY += ["distinct_id", "true", "false", 0, -1, None, True]


@pytest.mark.parametrize("user_id", NOBODY)
def test_a_track_from_nobody_is_an_anonymous_event(segment, tenant, user_id):
    before = counts(tenant)

    response = segment.track(user_id, "Report Exported")

    assert response.status_code == 400
    assert response.json()["code"] == "anonymous_event"
    assert response.json()["field"] == "userId"
    assert counts(tenant) == before


@pytest.mark.parametrize("user_id", ["null", "undefined", "NaN", "anonymous", " "])
def test_an_identify_from_nobody_is_missing_its_user_id(segment, tenant, user_id):
    bare_user(tenant, X)
    before = counts(tenant)

    response = segment.identify(user_id, {"email": X})

    assert response.status_code == 400
    assert response.json()["code"] == "missing_user_id"
    assert counts(tenant) == before
    assert EndUser.objects.get().user_id is None  # the bare user was not claimed by "nobody"


def test_an_alias_from_nobody_names_no_previous_id(segment, tenant):
    before = counts(tenant)

    response = segment.post("/v1/alias", {"previousId": "undefined", "userId": "1"})

    assert response.status_code == 400
    assert response.json()["code"] == "missing_previous_id"
    assert counts(tenant) == before


def test_numeric_user_ids_are_the_same_as_their_text(segment, tenant):
    ok(segment.identify(42, {"name": "Number"}))
    ok(segment.track("42", "Report Exported"))

    [user] = all_users(tenant)
    assert user.user_id == "42" and user.name == "Number"
    assert Event.objects.filter(user=user).count() == 2


# --- Message order -----------------------------------------------------------------------


def test_an_older_identify_never_overwrites_newer_traits(segment, tenant):
    newer = {"name": "New", "email": "new@example.com", "billingId": "cus_New1"}
    ok(segment.identify("1", newer, timestamp=iso(10)))

    ok(segment.identify("1", {"name": "Old", "email": "old@example.com", "billingId": "cus_Old1"}, timestamp=iso(5)))

    user = user_for(tenant, "1")
    assert (user.name, user.email, user.billing_id) == ("New", "new@example.com", "cus_New1")
    assert user.name_set_at == at(10)


def test_the_newest_message_wins_even_when_it_repeats_the_current_value(segment, tenant):
    # Sent at 1, 10 and 5; the one sent at 10 repeats the value set at 1. Arrival order must
    # not matter: in time order the user ends with the name sent at 10.
    ok(segment.identify("1", {"name": "Ann"}, timestamp=iso(1)))
    ok(segment.identify("1", {"name": "Ann"}, timestamp=iso(10)))
    ok(segment.identify("1", {"name": "Late Annie"}, timestamp=iso(5)))

    user = user_for(tenant, "1")
    assert (user.name, user.name_set_at) == ("Ann", at(10))


def test_each_field_keeps_the_newest_value_sent_for_it(segment, tenant):
    ok(segment.identify("1", {"name": "Name at 10"}, timestamp=iso(10)))
    ok(segment.identify("1", {"email": "at5@example.com", "name": "Name at 5"}, timestamp=iso(5)))

    user = user_for(tenant, "1")
    assert (user.name, user.email) == ("Name at 10", "at5@example.com")  # email was never set later


def test_a_null_trait_clears_the_field_and_an_absent_one_leaves_it(segment, tenant):
    ok(segment.identify("1", {"name": "Ann", "email": X, "billingUserId": "cus_Ann1"}, timestamp=iso(0)))

    ok(segment.identify("1", {"name": None}, timestamp=iso(1)))

    user = user_for(tenant, "1")
    assert (user.name, user.email, user.billing_id) == ("", X, "cus_Ann1")
    ok(segment.identify("1", {"billingUserId": None}, timestamp=iso(2)))
    user = user_for(tenant, "1")
    assert (user.billing_id, user.billing_provider) == ("", "")
    assert "no_billing_id" in flags(user)


def test_an_older_null_does_not_clear_a_newer_value(segment, tenant):
    ok(segment.identify("1", {"email": X}, timestamp=iso(10)))

    ok(segment.identify("1", {"email": None}, timestamp=iso(5)))

    assert user_for(tenant, "1").email == X


# --- Replays -----------------------------------------------------------------------------


def test_a_replayed_identify_changes_nothing(segment, tenant):
    ok(segment.identify("1", {"name": "First"}, messageId="m-1"))
    before = counts(tenant)

    body = ok(segment.identify("1", {"name": "Replayed"}, messageId="m-1"))

    assert body["status"] == "duplicate"
    assert counts(tenant) == before
    assert user_for(tenant, "1").name == "First"


def test_a_replayed_merge_merges_once(segment, tenant):
    ok(segment.identify("1"))
    bare_user(tenant, X)
    ok(segment.identify("1", {"email": X}, messageId="merge-1"))
    bare_user(tenant, X, name="Second bare")  # would be merged if the message were applied again
    before = counts(tenant)

    assert ok(segment.identify("1", {"email": X}, messageId="merge-1"))["status"] == "duplicate"

    assert counts(tenant) == before
    assert MergeRecord.objects.count() == 1


def test_a_replayed_batch_changes_nothing(segment, tenant):
    feature_create(workspace=tenant.workspace, key="reports")
    messages = [
        {"type": "identify", "userId": "1", "traits": {"name": "Ann"}, "messageId": "b-1"},
        {"type": "track", "userId": "1", "event": "Report", "properties": {"featureId": "reports"}, "messageId": "b-2"},
        {"type": "group", "userId": "1", "groupId": "acme", "messageId": "b-3"},
    ]
    assert ok(segment.batch(messages)) == {"success": True, "accepted": 3, "duplicates": 0, "rejected": []}
    before = counts(tenant)

    messages[0]["traits"]["name"] = "Changed"
    assert ok(segment.batch(messages)) == {"success": True, "accepted": 0, "duplicates": 3, "rejected": []}

    assert counts(tenant) == before
    assert Usage.objects.count() == 1
    assert user_for(tenant, "1").name == "Ann"


def test_a_message_twice_in_one_batch_is_applied_once(segment, tenant):
    feature_create(workspace=tenant.workspace, key="reports")
    track = {"type": "track", "userId": "1", "event": "Report", "properties": {"featureId": "reports"}}
    identify = {"type": "identify", "userId": "1", "messageId": "i-1"}
    messages = [
        {**track, "messageId": "t-1"},
        {**track, "messageId": "t-1"},
        {**identify, "traits": {"name": "First"}},
        {**identify, "traits": {"name": "Second"}},
    ]

    assert ok(segment.batch(messages)) == {"success": True, "accepted": 2, "duplicates": 2, "rejected": []}

    assert Event.objects.count() == 2
    assert Usage.objects.get().amount == Decimal(1)
    assert user_for(tenant, "1").name == "First"


def test_message_ids_are_unique_per_workspace_not_globally(segment, tenant, other_tenant):
    from .conftest import SegmentClient

    ok(segment.track("1", "Report", messageId="shared-id"))

    body = ok(SegmentClient(other_tenant).track("1", "Report", messageId="shared-id"))

    assert body["status"] == EventStatus.UNMAPPED
    assert Event.objects.filter(message_id="shared-id").count() == 2


# --- Merges --------------------------------------------------------------------------------


def test_events_for_a_merged_away_user_id_land_on_the_survivor(segment, tenant):
    ok(segment.identify("old"))
    ok(segment.identify("new"))
    survivor, absorbed = user_for(tenant, "old"), user_for(tenant, "new")
    ok(segment.track("new", "Before Merge"))
    merge_users(workspace=tenant.workspace, user_pks=[absorbed.pk, survivor.pk], actor="admin@acme")

    ok(segment.track("new", "After Merge"))
    ok(segment.post("/v1/group", {"userId": "new", "groupId": "acme"}))

    assert len(all_users(tenant)) == 1
    assert set(Event.objects.filter(user=survivor).values_list("name", flat=True)) >= {"Before Merge", "After Merge"}
    assert Event.objects.get(name="After Merge").external_user_id == "new"
    assert GroupMembership.objects.get().user_id == survivor.pk
    assert identities_of(survivor) == {"old", "new"}


def test_a_merge_keeps_the_most_recently_set_value_and_fills_blanks(segment, tenant):
    # The bare user's name is newer than A's; A has the newer billing id; only B has an audience.
    ok(segment.identify("1", {"name": "Name at 1", "billingId": "cus_A1"}, timestamp=iso(1)))
    a = user_for(tenant, "1")
    b = bare_user(tenant, X, name="Name at 2", billing_id="cus_B0", occurred_at=at(-5))
    b.refresh_from_db()
    EndUser.objects.filter(pk=b.pk).update(name_set_at=at(2))
    ok(segment.track("1", "Used by A"))

    ok(segment.identify("1", {"email": X}, timestamp=iso(3)))

    [survivor] = all_users(tenant)
    assert survivor.pk == a.pk
    assert (survivor.name, survivor.name_set_at) == ("Name at 2", at(2))
    assert (survivor.billing_id, survivor.billing_provider) == ("cus_A1", BillingProvider.STRIPE)
    assert (survivor.email, survivor.email_set_at) == (X, at(3))
    record = MergeRecord.objects.get()
    assert record.reason == MergeReason.IDENTIFY and record.actor == "segment"
    assert (record.survivor_id, record.survivor_key, record.absorbed_id) == (a.pk, a.pk, b.pk)
    snapshot = record.absorbed_snapshot
    assert snapshot["id"] == b.pk and snapshot["user_id"] is None and snapshot["user_ids"] == []
    assert (snapshot["name"], snapshot["email"], snapshot["billing_id"]) == ("Name at 2", X, "cus_B0")
    assert snapshot["created_at"] == b.created_at.isoformat()


def test_a_merge_moves_events_usage_audiences_and_user_ids(segment, tenant):
    feature_create(workspace=tenant.workspace, key="reports")
    ok(segment.identify("older"))
    ok(
        segment.identify(
            "younger",
            context={"personas": {"computation_class": "audience", "computation_key": "vip"}},
            traits={"vip": True},
        )
    )
    ok(segment.track("younger", "Report", {"featureId": "reports", "delta": 3}))
    survivor, absorbed = user_for(tenant, "older"), user_for(tenant, "younger")

    result = merge_users(workspace=tenant.workspace, user_pks=[survivor.pk, absorbed.pk], actor="admin@acme")

    assert result.survivor.pk == survivor.pk and result.absorbed_ids == [absorbed.pk]
    survivor.refresh_from_db()
    assert survivor.audience_values() == {"vip": True}
    assert Usage.objects.get().user_id == survivor.pk
    assert set(Event.objects.values_list("user_id", flat=True)) == {survivor.pk}
    assert user_for(tenant, "younger").pk == survivor.pk
    record = MergeRecord.objects.get()
    assert (record.reason, record.actor) == (MergeReason.ADMIN, "admin@acme")
    assert record.absorbed_snapshot["user_ids"] == ["younger"]
    assert record.absorbed_snapshot["audiences"] == {"vip": True}
    again = merge_users(workspace=tenant.workspace, user_pks=[survivor.pk, absorbed.pk])
    assert again.already_merged and MergeRecord.objects.count() == 1


# --- Alias --------------------------------------------------------------------------------


def alias(segment, previous_id, user_id, **fields):
    return segment.post("/v1/alias", {"previousId": previous_id, "userId": user_id, **fields})


def test_alias_between_two_known_users_merges_into_the_oldest(segment, tenant):
    ok(segment.identify("anon-1", {"name": "Visitor"}))
    ok(segment.identify("user-1", {"email": X}))
    oldest, younger = user_for(tenant, "anon-1"), user_for(tenant, "user-1")
    ok(segment.track("user-1", "Signed Up"))

    ok(alias(segment, "anon-1", "user-1"))

    [survivor] = all_users(tenant)
    assert survivor.pk == oldest.pk
    assert survivor.user_id == "user-1"  # userId is canonical
    assert (survivor.name, survivor.email) == ("Visitor", X)
    assert identities_of(survivor) == {"anon-1", "user-1"}
    assert user_for(tenant, "anon-1").pk == survivor.pk  # previousId still resolves
    assert Event.objects.get(name="Signed Up").user_id == survivor.pk
    record = MergeRecord.objects.get()
    assert (record.reason, record.absorbed_id) == (MergeReason.ALIAS, younger.pk)
    ok(segment.track("anon-1", "Later"))
    assert Event.objects.get(name="Later").user_id == survivor.pk


def test_alias_when_the_user_id_is_the_older_user(segment, tenant):
    ok(segment.identify("user-1"))
    ok(segment.identify("anon-1"))
    oldest = user_for(tenant, "user-1")

    ok(alias(segment, "anon-1", "user-1"))

    [survivor] = all_users(tenant)
    assert (survivor.pk, survivor.user_id) == (oldest.pk, "user-1")
    assert identities_of(survivor) == {"anon-1", "user-1"}


def test_alias_of_an_unknown_previous_id_adds_it_to_the_user(segment, tenant):
    ok(segment.identify("user-1"))
    user = user_for(tenant, "user-1")

    ok(alias(segment, "never-seen", "user-1"))
    ok(segment.track("never-seen", "Report"))

    assert len(all_users(tenant)) == 1
    assert identities_of(user) == {"user-1", "never-seen"}
    assert Event.objects.get(name="Report").user_id == user.pk
    assert not MergeRecord.objects.exists()


def test_alias_of_a_known_previous_id_to_a_new_user_id_renames_the_user(segment, tenant):
    ok(segment.identify("anon-1", {"name": "Visitor"}))
    user = user_for(tenant, "anon-1")

    ok(alias(segment, "anon-1", "user-1"))

    [renamed] = all_users(tenant)
    assert (renamed.pk, renamed.user_id, renamed.name) == (user.pk, "user-1", "Visitor")
    assert identities_of(renamed) == {"anon-1", "user-1"}


def test_alias_of_two_unknown_ids_creates_one_user(segment, tenant):
    ok(alias(segment, "anon-1", "user-1"))

    [user] = all_users(tenant)
    assert user.user_id == "user-1" and identities_of(user) == {"anon-1", "user-1"}


def test_alias_replayed_or_repeated_changes_nothing(segment, tenant):
    ok(segment.identify("anon-1"))
    ok(segment.identify("user-1"))
    ok(alias(segment, "anon-1", "user-1", messageId="a-1"))
    before = counts(tenant)

    assert ok(alias(segment, "anon-1", "user-1", messageId="a-1"))["status"] == "duplicate"
    ok(alias(segment, "anon-1", "user-1", messageId="a-2"))  # a new message, already one user

    users, ids, events, merges = counts(tenant)
    assert (users, ids, merges) == before[:2] + before[3:]
    assert events == before[2] + 1


def test_alias_to_itself_is_refused(segment, tenant):
    response = alias(segment, "user-1", "user-1")

    assert response.status_code == 400 and response.json()["field"] == "previousId"
    assert counts(tenant) == (0, 0, 0, 0)


# --- Group ----------------------------------------------------------------------------------


def group(segment, user_id, group_id, traits=None, **fields):
    return segment.post("/v1/group", {"userId": user_id, "groupId": group_id, "traits": traits or {}, **fields})


def test_group_records_membership_and_traits(segment, tenant):
    ok(segment.identify("1"))

    ok(group(segment, "1", "acme", {"name": "Acme", "plan": "pro"}, timestamp=iso(1)))
    ok(group(segment, "2", "acme", timestamp=iso(2)))  # unknown user: created with only its id
    ok(group(segment, "1", "acme", {"name": "Acme Inc", "plan": "enterprise"}, timestamp=iso(3)))
    ok(group(segment, "1", "acme", {"name": "Stale"}, timestamp=iso(0)))

    acme = Group.objects.get(group_id="acme")
    assert acme.traits == {"name": "Acme Inc", "plan": "enterprise"}
    members = set(GroupMembership.objects.filter(group=acme).values_list("user__user_id", flat=True))
    assert members == {"1", "2"}
    assert GroupMembership.objects.get(user=user_for(tenant, "1")).joined_at == at(1)
    assert Event.objects.filter(type="group", status=EventStatus.PROCESSED).count() == 4


def test_group_without_a_group_id_is_refused(segment, tenant):
    response = group(segment, "1", "null")

    assert response.status_code == 400 and response.json()["code"] == "missing_group_id"
    assert counts(tenant) == (0, 0, 0, 0)


def test_a_merge_keeps_one_membership_per_group(segment, tenant):
    ok(group(segment, "a", "acme"))
    ok(group(segment, "b", "acme"))
    ok(group(segment, "b", "globex"))

    ok(alias(segment, "b", "a"))

    [user] = all_users(tenant)
    assert sorted(GroupMembership.objects.filter(user=user).values_list("group__group_id", flat=True)) == [
        "acme",
        "globex",
    ]


# --- Billing ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "billing_id, provider",
    [
        ("cus_NffrFeUfNV2Hib", BillingProvider.STRIPE),
        ("16BjnKSaUH4ZE1zk", BillingProvider.CHARGEBEE),
        ("AzqNmVU1a.b-c_d@x", BillingProvider.CHARGEBEE),
        ("c" * 50, BillingProvider.CHARGEBEE),
    ],
)
def test_valid_billing_ids_are_stored_with_their_provider(segment, tenant, billing_id, provider):
    body = ok(segment.identify("1", {"billingUserId": billing_id}))

    user = user_for(tenant, "1")
    assert (user.billing_id, user.billing_provider) == (billing_id, provider)
    assert "warnings" not in body
    assert "no_billing_id" not in flags(user)


def test_billing_id_is_also_read_from_the_billing_id_trait(segment, tenant):
    ok(segment.identify("1", {"billingId": "cus_Destination1"}))

    assert user_for(tenant, "1").billing_id == "cus_Destination1"


@pytest.mark.parametrize("billing_id", ["not a billing id!", "c" * 51, "cus_" + "a" * 60, "cus_ü", {"id": 1}])
def test_an_invalid_billing_id_is_not_stored_and_the_rest_is_applied(segment, tenant, billing_id):
    ok(segment.identify("1", {"billingId": "cus_Before1"}, timestamp=iso(0)))

    body = ok(segment.identify("1", {"billingId": billing_id, "name": "Ann", "email": X}, timestamp=iso(1)))

    user = user_for(tenant, "1")
    assert (user.billing_id, user.name, user.email) == ("cus_Before1", "Ann", X)
    [warning] = body["warnings"]
    assert warning["code"] == "invalid_billing_id" and warning["field"] == "traits.billing_id"
    event = Event.objects.get(message_id=body["message_id"])
    assert event.warnings == body["warnings"]
    assert event.status == EventStatus.PROCESSED


# --- Engage audiences ---------------------------------------------------------------------------


def engage(computation_class, key):
    return {"personas": {"computation_class": computation_class, "computation_key": key, "space_id": "spa_1"}}


def test_an_engage_audience_identify_is_recorded_on_the_user(segment, tenant):
    ok(segment.identify("1", {"email": X}))

    ok(segment.identify("1", {"power_users": True, "email": X}, context=engage("audience", "power_users")))
    ok(segment.identify("1", {"ltv_bucket": "high"}, context=engage("trait", "ltv_bucket")))

    user = user_for(tenant, "1")
    assert user.audience_values() == {"ltv_bucket": "high", "power_users": True}
    assert user.email == X


def test_leaving_an_audience_is_recorded_and_an_older_message_does_not_undo_it(segment, tenant):
    context = engage("audience", "trial_users")
    ok(segment.identify("1", {"trial_users": True}, context=context, timestamp="2024-05-01T12:00:00Z"))
    ok(segment.identify("1", {"trial_users": False}, context=context, timestamp="2024-05-01T12:30:00Z"))

    # Older (11:00 UTC) although its local clock text reads later.
    ok(segment.identify("1", {"trial_users": True}, context=context, timestamp="2024-05-01T13:00:00+02:00"))

    assert user_for(tenant, "1").audience_values() == {"trial_users": False}


def test_plain_traits_are_not_audiences(segment, tenant):
    ok(segment.identify("1", {"plan": "pro", "company": "Acme"}))

    assert user_for(tenant, "1").audiences == {}


def test_batch_level_engage_context_applies_to_each_identify(segment, tenant):
    messages = [{"type": "identify", "userId": uid, "traits": {"churn_risk": uid == "1"}} for uid in ("1", "2")]

    ok(segment.batch(messages, context=engage("audience", "churn_risk")))

    assert user_for(tenant, "1").audience_values() == {"churn_risk": True}
    assert user_for(tenant, "2").audience_values() == {"churn_risk": False}


# --- Flags -------------------------------------------------------------------------------------


def test_flags_follow_billing_ids_and_shared_emails(segment, tenant):
    ok(segment.identify("1", {"email": X}))
    assert flags(user_for(tenant, "1")) == ["no_billing_id"]

    ok(segment.identify("2", {"email": X.upper(), "billingId": "cus_Two1"}))
    assert flags(user_for(tenant, "1")) == ["no_billing_id", "same_email"]
    assert flags(user_for(tenant, "2")) == ["same_email"]

    ok(segment.identify("1", {"email": "own@example.com", "billingId": "cus_One1"}))
    assert flags(user_for(tenant, "1")) == [] and flags(user_for(tenant, "2")) == []


def test_flags_of_reads_the_same_answer_without_the_annotation(segment, tenant):
    from users.selectors import flags_of

    ok(segment.identify("1", {"email": X}))
    ok(segment.identify("2", {"email": X}))

    assert flags_of(EndUser.objects.get(user_id="1")) == ["no_billing_id", "same_email"]
