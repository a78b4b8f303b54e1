"""Kana's ten published identify cases (SPEC §4), each driven through POST /v1/identify.

Payload in every case: ``{userId: "1", email: x@}``. "A", "B", "C" are named as in the table;
users are created in table order, so A is the oldest unless a case says otherwise.
In cases 9 and 10, C gets x@ by a direct update (REST, CSV row with kana_id): an identify
would already have claimed the bare B.
"""

from features.models import Event
from users.models import EndUser, MergeReason, MergeRecord

from .identity_support import all_users, bare_user, flags, identities_of, ok, set_email, user_for

X = "x@example.com"
Z = "z@example.com"


def identify(segment, user_id, **traits):
    return ok(segment.identify(user_id, traits))


def identify_sharing(segment, email, *user_ids):
    """Users ``user_ids``, created in that order, each identified with ``email``."""
    for user_id in user_ids:
        identify(segment, user_id, email=email)


def test_case_1_a_without_email_is_updated(segment, tenant):
    identify(segment, "1")
    identify(segment, "1", email=X, name="Ann")

    [a] = all_users(tenant)
    assert (a.user_id, a.email, a.name) == ("1", X, "Ann")
    assert not MergeRecord.objects.exists()


def test_case_2_a_takes_an_email_another_user_already_has(segment, tenant):
    identify(segment, "1")
    identify(segment, "2", email=X)

    identify(segment, "1", email=X)

    a, b = user_for(tenant, "1"), user_for(tenant, "2")
    assert a.pk != b.pk
    assert a.email == X and b.email == X
    assert "same_email" in flags(a) and "same_email" in flags(b)
    assert len(all_users(tenant)) == 2
    assert not MergeRecord.objects.exists()


def test_case_3_a_already_sharing_the_email_is_updated(segment, tenant):
    identify_sharing(segment, X, "1", "2")

    identify(segment, "1", email=X, name="Updated")

    a, b = user_for(tenant, "1"), user_for(tenant, "2")
    assert a.name == "Updated" and b.name == ""
    assert a.pk != b.pk and len(all_users(tenant)) == 2
    assert not MergeRecord.objects.exists()


def test_case_4_a_moves_from_a_shared_email_to_a_new_one(segment, tenant):
    identify_sharing(segment, Z, "1", "2")

    identify(segment, "1", email=X)

    a, b = user_for(tenant, "1"), user_for(tenant, "2")
    assert a.email == X and b.email == Z
    assert "same_email" not in flags(a) and "same_email" not in flags(b)
    assert len(all_users(tenant)) == 2


def test_case_5_a_is_created_beside_a_known_user_with_the_email(segment, tenant):
    identify(segment, "3", email=X)

    identify(segment, "1", email=X)

    a, b = user_for(tenant, "1"), user_for(tenant, "3")
    assert a.pk != b.pk
    assert (a.user_id, a.email) == ("1", X)
    assert b.user_id == "3" and b.email == X
    assert len(all_users(tenant)) == 2
    assert not MergeRecord.objects.exists()


def test_case_6_a_takes_the_email_of_a_known_user(segment, tenant):
    identify(segment, "1", email=Z)
    identify(segment, "3", email=X)

    identify(segment, "1", email=X)

    a, b = user_for(tenant, "1"), user_for(tenant, "3")
    assert a.email == X and b.email == X and a.pk != b.pk
    assert len(all_users(tenant)) == 2
    assert not MergeRecord.objects.exists()


def test_case_7_a_and_the_bare_user_with_the_email_are_merged(segment, tenant):
    identify(segment, "1")
    a_pk = user_for(tenant, "1").pk
    b = bare_user(tenant, X, billing_id="cus_Bare123")

    body = identify(segment, "1", email=X)

    [survivor] = all_users(tenant)
    assert survivor.pk == a_pk  # A was created first
    assert survivor.user_id == "1" and survivor.email == X
    assert survivor.billing_id == "cus_Bare123"  # filled from the absorbed user
    assert not EndUser.objects.filter(pk=b.pk).exists()
    record = MergeRecord.objects.get()
    assert (record.survivor_id, record.absorbed_id, record.reason) == (a_pk, b.pk, MergeReason.IDENTIFY)
    assert record.source == f"message:{body['message_id']}"
    assert Event.objects.get(message_id=body["message_id"]).user_id == a_pk


def test_case_7_when_the_bare_user_is_older_it_survives_and_gets_the_user_id(segment, tenant):
    b = bare_user(tenant, X)
    identify(segment, "1", name="Ann")
    a_pk = user_for(tenant, "1").pk

    identify(segment, "1", email=X)

    [survivor] = all_users(tenant)
    assert survivor.pk == b.pk
    assert (survivor.user_id, survivor.email, survivor.name) == ("1", X, "Ann")
    assert identities_of(survivor) == {"1"}
    assert MergeRecord.objects.get().absorbed_id == a_pk


def test_case_8_the_bare_user_is_claimed(segment, tenant):
    b = bare_user(tenant, X, name="From Stripe")

    identify(segment, "1", email=X)

    [user] = all_users(tenant)
    assert user.pk == b.pk
    assert (user.user_id, user.email, user.name) == ("1", X, "From Stripe")
    assert user_for(tenant, "1").pk == b.pk
    assert not MergeRecord.objects.exists()


def test_case_9_a_is_created_and_flagged_when_the_email_matches_a_bare_and_a_known_user(segment, tenant):
    b = bare_user(tenant, X)
    identify(segment, "2")
    c = set_email(user_for(tenant, "2"), X)

    body = identify(segment, "1", email=X)

    a = user_for(tenant, "1")
    assert a.pk not in (b.pk, c.pk)
    assert len(all_users(tenant)) == 3
    assert EndUser.objects.get(pk=b.pk).user_id is None  # B not claimed
    assert not MergeRecord.objects.exists()
    for user in (a, b, c):
        assert "same_email" in flags(user)
    assert [w["code"] for w in body["warnings"]] == ["ambiguous_email_match"]


def test_case_10_a_is_updated_and_flagged_when_the_email_matches_a_bare_and_a_known_user(segment, tenant):
    identify(segment, "1", email=Z)
    a_pk = user_for(tenant, "1").pk
    b = bare_user(tenant, X)
    identify(segment, "2")
    set_email(user_for(tenant, "2"), X)

    body = identify(segment, "1", email=X)

    a = user_for(tenant, "1")
    assert a.pk == a_pk and a.email == X
    assert len(all_users(tenant)) == 3
    assert EndUser.objects.get(pk=b.pk).user_id is None
    assert not MergeRecord.objects.exists()
    assert "same_email" in flags(a) and "same_email" in flags(b)
    assert [w["code"] for w in body["warnings"]] == ["ambiguous_email_match"]
