"""Round trips per identify, one message per request, by kind (create, update, claim, merge).

Outside any transaction (as in production), on PostgreSQL, a single identify is one
transaction whose BEGIN travels with the advisory locks, the reads of its users and the
replay and suppression check (``users.identity.MessageIdentify``); then the engine's write
back in one message, the event with the COMMIT. A merge goes on in ``atomic`` from there (its
receivers may enqueue work on commit: ``kana.db.pipelined.atomic``); its moves are
set-based and travel with the other layers' (``users.merges``).
"""

import re
import tempfile
import threading
from contextlib import contextmanager

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from features.models import Event
from kana.db import pipelined, prepared
from users.identity import WRITE_BACK_STATEMENTS
from users.models import EndUser, MergeRecord, UserIdentity
from users.profile import ProfileChanges
from users.services import upsert_user_by_email
from users.signals import user_absorbed

from .conftest import database_url_for_subprocess, requires_postgres, wait_until


def _identify(segment, user_id, traits, message_id, **fields):
    body = {"type": "identify", "userId": user_id, "messageId": message_id, "traits": traits, **fields}
    with CaptureQueriesContext(connection) as captured:
        response = segment.post("/segment/events", body)
    assert response.status_code == 200, response.content
    assert not pipelined.in_transaction()
    return [query["sql"] for query in captured.captured_queries], response.json()


def _bare(tenant, email, billing_id):
    changes = ProfileChanges(name="Bare", email=email, billing_id=billing_id)
    return upsert_user_by_email(workspace=tenant.workspace, changes=changes, occurred_at=timezone.now()).user


@pytest.fixture(autouse=True)
def _warm(segment, db):
    """The API key is cached per process: a first request reads it. The write back's
    statements are prepared once per connection (``kana.db.prepared``): prepared here, as
    earlier requests on a kept connection would have (the first use is pinned below)."""
    assert segment.identify("warm-up", {"name": "Warm"}).status_code == 200
    # The first round trip's statements and the event's insert are prepared too, a shape per
    # kind of message (a userId with or without an email; the insert with the COMMIT or, after
    # an anonymousId or in a merge, without): each used once, as on a kept connection.
    assert segment.identify("warm-up", {"email": "warm-up@example.com"}, anonymousId="warm-up").status_code == 200
    if connection.vendor == "postgresql":
        for sql in WRITE_BACK_STATEMENTS:
            prepared.statement(sql)


@pytest.fixture
def known(segment):
    sent, _ = _identify(segment, "known", {"name": "Known", "email": "known@example.com"}, "seed")
    return EndUser.objects.get(user_id="known")


def _receivers_steps(tenant) -> int:
    """The statements the ``user_absorbed`` receivers (features, entitlements, webhooks: other
    layers' moves) hand to the merge for its message; they send none themselves."""
    with transaction.atomic(), CaptureQueriesContext(connection) as captured:
        responses = user_absorbed.send(EndUser, workspace_id=tenant.workspace.pk, absorbed_pk=-1, survivor_pk=-2)
    transaction_control = ("SAVEPOINT", "RELEASE", "BEGIN", "COMMIT")
    assert [q for q in captured.captured_queries if not q["sql"].startswith(transaction_control)] == []
    return sum(len(steps) for _receiver, steps in responses)


def _as_prepared(sql: str) -> str:
    """``sql`` with each ``EXECUTE kana_…`` replaced by the text the server holds for it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, statement FROM pg_prepared_statements")
        texts = dict(cursor.fetchall())
    return re.sub(r"EXECUTE (kana_\w+)(\((?:[^()']|'[^']*')*\))?", lambda m: texts[m.group(1)], sql)


def _opens_with_locks_and_reads(sent):
    # Every statement of the first round trip and the event's insert is a prepared one.
    assert sent[0].startswith("BEGIN; EXECUTE kana_") and sent[0].count("EXECUTE kana_") == 4
    assert sent[-1].startswith("EXECUTE kana_") and sent[-1].endswith("; COMMIT")
    first = _as_prepared(sent[0])
    assert first.startswith("BEGIN; PREPARE kana_") and " AS SELECT pg_advisory_xact_lock(" in first
    assert "FOR UPDATE" in first and "features_event" in first  # the users' lock, then the replay check
    assert first.index("FOR UPDATE") < first.index("features_event")
    assert " AS INSERT INTO features_event" in _as_prepared(sent[-1])


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_creating_a_user_is_three_round_trips(segment):
    sent, body = _identify(segment, "new-1", {"name": "New", "email": "new-1@example.com"}, "m-create")
    assert body["status"] == "processed"
    assert len(sent) == 3  # was 10, then 4 (the COMMIT on its own)
    _opens_with_locks_and_reads(sent)
    user = EndUser.objects.get(user_id="new-1")
    assert (user.name, user.email_key) == ("New", "new-1@example.com")
    assert UserIdentity.objects.get(external_id="new-1").user_id == user.pk
    assert Event.objects.get(message_id="m-create").user_id == user.pk


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_updating_a_known_user_is_three_round_trips(segment, known):
    sent, _ = _identify(segment, "known", {"name": "Renamed", "email": "known@example.com"}, "m-update")
    assert len(sent) == 3  # was 9, then 4
    _opens_with_locks_and_reads(sent)
    known.refresh_from_db()
    assert known.name == "Renamed"
    assert Event.objects.get(message_id="m-update").user_id == known.pk


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_claiming_a_bare_user_is_three_round_trips(segment, tenant):
    bare = _bare(tenant, "claim@example.com", "cus_1")
    sent, _ = _identify(segment, "claimer", {"name": "Claimer", "email": "claim@example.com"}, "m-claim")
    assert len(sent) == 3  # was 10, then 4
    _opens_with_locks_and_reads(sent)
    bare.refresh_from_db()
    assert (bare.user_id, bare.name, bare.billing_id) == ("claimer", "Claimer", "cus_1")
    assert UserIdentity.objects.get(external_id="claimer").user_id == bare.pk
    assert EndUser.objects.count() == 2  # the warm-up user and the claimed one


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_whose_message_id_another_request_stores_meanwhile_changes_nothing(segment, known):
    # Another request (a different user: it takes other locks) stores the messageId after
    # this one's replay check: this one's event insert waits for it, then fails; its COMMIT,
    # which travels with that insert, must not run, or the profile write would stay without
    # its event. Retried, the message is a replay.
    columns = [f.column for f in Event._meta.concrete_fields if not f.primary_key]
    # No user on it: its foreign key, checked at its commit, must not wait for this request's
    # row lock on the known user (a deadlock, settled otherwise).
    replaced = {"message_id": "%s", "user_id": "NULL"}
    copied = ", ".join(replaced.get(column, column) for column in columns)
    other = psycopg.connect(database_url_for_subprocess())
    other.execute(
        f"INSERT INTO features_event ({', '.join(columns)}) SELECT {copied} FROM features_event WHERE message_id = %s",
        ["m-raced", "seed"],
    )

    def commit_once_waited_for():
        with psycopg.connect(database_url_for_subprocess(), autocommit=True) as watcher:
            pid = other.info.backend_pid
            wait_until(
                lambda: watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid]
                ).fetchone()[0],
                message="the identify's insert waiting",
            )
        other.commit()

    committer = threading.Thread(target=commit_once_waited_for)
    committer.start()
    try:
        sent, body = _identify(segment, "known", {"name": "Raced"}, "m-raced")
    finally:
        committer.join()
        other.close()
    assert body["status"] == "duplicate"
    known.refresh_from_db()
    assert known.name == "Known"
    assert Event.objects.filter(message_id="m-raced").count() == 1


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_replayed_identify_is_two_round_trips_and_changes_nothing(segment, known):
    _identify(segment, "known", {"name": "Once"}, "m-once")
    sent, body = _identify(segment, "known", {"name": "Twice"}, "m-once")
    assert body["status"] == "duplicate"
    assert len(sent) == 2
    known.refresh_from_db()
    assert known.name == "Once"


@contextmanager
def _on_the_wire():
    """The messages the connection sends to the server meanwhile (libpq's trace): Django's
    log notes a ``BEGIN`` when ``atomic`` starts even when psycopg sends none."""
    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    sent: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        try:
            yield sent
        finally:
            pgconn.untrace()
        trace.seek(0)
        # A line per protocol message: time, direction (F: from the client), length, type, body.
        for line in trace:
            _time, direction, _length, kind, body = line.rstrip("\n").split("\t", 4)
            if direction == "F":
                sent.append(f"{kind}{body}")


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_merging_a_bare_user_goes_on_in_atomic_with_set_based_moves(segment, tenant):
    _identify(segment, "mrg", {"name": "Merging"}, "seed")
    bare = _bare(tenant, "mrgbare@example.com", "cus_2")
    # A merge's statements are prepared on the connection's first merge: one first, as a kept
    # connection would have done.
    _identify(segment, "mrg-0", {"name": "Merging"}, "seed-0")
    _bare(tenant, "mrgbare-0@example.com", "cus_0")
    _identify(segment, "mrg-0", {"email": "mrgbare-0@example.com"}, "m-merge-0")
    with _on_the_wire() as wire:
        sent, _ = _identify(segment, "mrg", {"email": "mrgbare@example.com"}, "m-merge")
    # Was 31, then 17 (a pipelined attempt rolled back, then everything again in atomic, the
    # ledger row and the receivers' moves one by one). Now the first message (BEGIN, locks +
    # reads) shows the merge, and the same transaction goes on as Django's atomic: the
    # merge's two reads, one message with the ledger row, the receivers' moves, its own moves
    # and the absorbed row's deletion, the survivor's write, the event, COMMIT.
    assert len(wire) == 6 and all(message.startswith('Query "') for message in wire)
    assert wire[0].startswith('Query "BEGIN; EXECUTE kana_') and "FOR UPDATE" in _as_prepared(wire[0])
    assert wire[-1] == 'Query "COMMIT"'
    assert sent[1] == "BEGIN" and len(sent) == 7  # Django's note when atomic starts: nothing sent
    moves = next(text for text in map(_as_prepared, sent) if "DELETE FROM users_enduser" in text)
    assert _receivers_steps(tenant) == 7  # events, usage; subscriptions (noted, moved), holds (2); endpoints
    assert all(statement.startswith("PREPARE kana_") for statement in moves.split("; "))  # each one prepared
    assert " AS INSERT INTO users_mergerecord" in moves.split(";")[0]
    assert moves.count(";") == 1 + 7 + 4  # the ledger row, the receivers' seven, then its own five
    assert moves.index("UPDATE features_event") < moves.index("DELETE FROM users_enduser")
    survivor = EndUser.objects.get(user_id="mrg")
    assert not EndUser.objects.filter(pk=bare.pk).exists()
    assert MergeRecord.objects.get(absorbed_id=bare.pk).survivor_id == survivor.pk
    assert (survivor.email, survivor.billing_id) == ("mrgbare@example.com", "cus_2")
    assert Event.objects.get(message_id="m-merge").user_id == survivor.pk


class _Refused(Exception):
    pass


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_merge_that_fails_after_its_transaction_became_atomic_leaves_nothing(segment, tenant):
    _identify(segment, "mrg", {"name": "Merging"}, "seed")
    bare = _bare(tenant, "failbare@example.com", "cus_3")
    committed = []

    def refuse(sender, **kwargs):
        transaction.on_commit(lambda: committed.append(True))
        raise _Refused()

    user_absorbed.connect(refuse, dispatch_uid="test.refuse")
    try:
        with pytest.raises(_Refused):
            segment.post(
                "/segment/events",
                {
                    "type": "identify",
                    "userId": "mrg",
                    "messageId": "m-fail",
                    "traits": {"email": "failbare@example.com"},
                },
            )
    finally:
        user_absorbed.disconnect(dispatch_uid="test.refuse")
    # Rolled back as a whole, the callback dropped, the connection back in autocommit with
    # no transaction open (psycopg's own flag too), and the next identify as usual.
    assert committed == []
    assert not pipelined.in_transaction() and connection.get_autocommit() and connection.connection.autocommit
    assert EndUser.objects.filter(pk=bare.pk).exists() and not MergeRecord.objects.exists()
    assert not Event.objects.filter(message_id="m-fail").exists()
    sent, body = _identify(segment, "mrg", {"name": "Again"}, "m-after")
    assert body["status"] == "processed" and len(sent) == 3
    sent, _ = _identify(segment, "mrg", {"email": "failbare@example.com"}, "m-fail")
    assert not EndUser.objects.filter(pk=bare.pk).exists()
    assert MergeRecord.objects.get(absorbed_id=bare.pk).survivor.user_id == "mrg"


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_with_an_anonymous_id_and_nothing_held_stays_pipelined(segment):
    sent, body = _identify(segment, "anon-user", {"name": "A"}, "m-anon", anonymousId="anon-1")
    assert body["status"] == "processed"
    assert len(sent) == 5  # + the probe for events held under the anonymousId
    assert EndUser.objects.filter(user_id="anon-user").exists()


def test_a_merge_in_a_transaction_moves_the_absorbed_user_in_a_few_statements(
    segment, tenant, django_assert_max_num_queries
):
    segment.identify("mrg", {"name": "Merging"})
    bare = _bare(tenant, "mrgbare@example.com", "cus_2")
    # Inside the test's transaction: savepoints, not the pipelined path. The merge's ledger
    # row, the receivers' moves, its own and the absorbed row's deletion are one message on
    # PostgreSQL (one statement each on SQLite).
    receivers = _receivers_steps(tenant) if connection.vendor != "postgresql" else 0
    with django_assert_max_num_queries((18 if connection.vendor != "postgresql" else 11) + receivers):
        assert segment.identify("mrg", {"email": "mrgbare@example.com"}).status_code == 200
    assert not EndUser.objects.filter(pk=bare.pk).exists()
    assert UserIdentity.objects.get(external_id="mrg").user.email == "mrgbare@example.com"


@requires_postgres
def test_the_users_lock_probes_the_owner_of_a_user_id_by_index(tenant):
    # Under the OR, ``id IN (SELECT ...)`` is a subplan run as a filter over every user of
    # the workspace (58 ms at 50,000 users); ``id = ANY(ARRAY(SELECT ...))`` runs once and
    # probes the primary key.
    from users import bulk

    sql, params = bulk.lock_users_sql(tenant.workspace, set(), {"a@example.com"}, owners_of={"known"})
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(line for (line,) in cursor.fetchall())
    assert "SubPlan" not in plan and "InitPlan" in plan, plan


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_s_statements_are_prepared_once_per_connection(segment, known):
    # As a new connection: nothing prepared on the server, nothing recorded for it.
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    prepared.forget_all()
    sent, _ = _identify(segment, "known", {"name": "Renamed"}, "m-first")
    # What the server holds; the locks' and the three reads' PREPAREs, before the transaction
    # opens; the locks and reads; the update's PREPARE inside it, the update; the event's.
    assert [sql.split()[0] for sql in sent] == ["SELECT", *["PREPARE"] * 4, "BEGIN;", *["PREPARE", "EXECUTE"] * 2]
    sent, _ = _identify(segment, "known", {"name": "Renamed again"}, "m-second")
    assert len(sent) == 3 and sent[1].startswith("EXECUTE kana_")
    assert EndUser.objects.get(user_id="known").name == "Renamed again"


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_after_its_statements_were_discarded_is_applied_once(segment, known):
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # behind the registry's back
    sent, answer = _identify(segment, "known", {"name": "After"}, "m-after")
    assert EndUser.objects.get(user_id="known").name == "After"
    assert Event.objects.filter(message_id="m-after").count() == 1
    assert len(_identify(segment, "known", {"name": "Later"}, "m-later")[0]) == 3


def _merge_pair(segment, tenant, k):
    _identify(segment, f"mrg-{k}", {"name": "Merging"}, f"seed-{k}")
    return _bare(tenant, f"mrgbare-{k}@example.com", f"cus_{k}")


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_merge_whose_statement_was_discarded_is_applied_once(segment, tenant):
    _merge_pair(segment, tenant, 0)
    _identify(segment, "mrg-0", {"email": "mrgbare-0@example.com"}, "m-merge-0")  # prepares the merge's statements
    bare = _merge_pair(segment, tenant, 1)
    # Behind the registry's back, only the merge's ledger row: the first round trip runs, the
    # merge's message fails in atomic; the identify runs again once, preparing it anew.
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements WHERE statement LIKE %s", ["%INSERT INTO users_merge%"])
        ((name,),) = cursor.fetchall()
        cursor.execute(f"DEALLOCATE {name}")
    _, body = _identify(segment, "mrg-1", {"email": "mrgbare-1@example.com"}, "m-merge-1")
    assert body["status"] == "processed"
    assert not EndUser.objects.filter(pk=bare.pk).exists()
    assert MergeRecord.objects.filter(absorbed_id=bare.pk).count() == 1
    assert Event.objects.filter(message_id="m-merge-1").count() == 1
    assert not pipelined.in_transaction() and connection.get_autocommit()


@pytest.fixture
def pipelines(monkeypatch):
    """``watch()``: from then on, the pipelines the connection sends (``kana.db.kept_cursor``)
    are listed, by statement (the prepared statement's name, or the text sent), and the
    one-message text paths are refused."""
    from kana.db import kept_cursor

    sent = []
    original = kept_cursor._pipeline

    def spy(pgconn, statements):
        sent.append([name or text for name, text, _values in statements])
        return original(pgconn, statements)

    def refused(*args, **kwargs):
        raise AssertionError("an identify's statements sent as text")

    def watch():
        monkeypatch.setattr(kept_cursor, "_pipeline", spy)
        monkeypatch.setattr(kept_cursor, "_as_one_message", refused)
        return sent

    return watch


def _post_identify(segment, user_id, traits, message_id) -> str:
    body = {"type": "identify", "userId": user_id, "messageId": message_id, "traits": traits}
    response = segment.post("/segment/events", body)
    assert response.status_code == 200, response.content
    assert not pipelined.in_transaction()
    return response.json()["status"]


def _prepared_names(pipeline) -> bool:
    return all(statement.startswith(b"kana_") for statement in pipeline)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_s_round_trips_are_pipelines_of_bound_prepared_statements(segment, tenant, known, pipelines):
    """When Django logs nothing (production), each round trip of an identify is a pipeline
    (``kana.db.kept_cursor.message_results``): its prepared statements by name, their values
    in Bind messages, no ``EXECUTE`` text for psycopg to format."""
    bare = _bare(tenant, "piped@example.com", "cus_p")
    sent = pipelines()
    for user_id, traits, message_id in [
        ("piped-new", {"name": "New", "email": "piped-new@example.com"}, "p-create"),
        ("known", {"name": "Renamed", "email": "known@example.com"}, "p-update"),
        ("piped-claimer", {"name": "Claimer", "email": "piped@example.com"}, "p-claim"),
    ]:
        sent.clear()
        assert _post_identify(segment, user_id, traits, message_id) == "processed"
        assert len(sent) == 3, message_id
        (begin, *first), write_back, (insert, commit) = sent
        assert begin == b"BEGIN" and len(first) == 4 and _prepared_names(first)  # locks, owners, users, replays
        assert _prepared_names(write_back) and insert.startswith(b"kana_") and commit == b"COMMIT"
    assert EndUser.objects.get(user_id="piped-new").email == "piped-new@example.com"
    assert EndUser.objects.get(user_id="known").name == "Renamed"
    bare.refresh_from_db()
    assert (bare.user_id, bare.name, bare.billing_id) == ("piped-claimer", "Claimer", "cus_p")
    assert Event.objects.filter(message_id__startswith="p-").count() == 3


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_merging_sends_its_merge_as_pipelines_of_bound_prepared_statements(segment, tenant, pipelines):
    _merge_pair(segment, tenant, 0)
    _identify(segment, "mrg-0", {"email": "mrgbare-0@example.com"}, "m-merge-0")  # prepares the merge's statements
    bare = _merge_pair(segment, tenant, 1)
    sent = pipelines()
    assert _post_identify(segment, "mrg-1", {"email": "mrgbare-1@example.com"}, "m-merge-1") == "processed"
    # The first round trip; the merge's reads; its ledger row, the receivers' moves and its
    # own; the survivor's write; the event. Django's atomic sends the COMMIT.
    assert len(sent) == 5
    first, reads, moves, write_back, (insert,) = sent
    assert first[0] == b"BEGIN" and _prepared_names(first[1:])
    assert len(reads) == 2 and len(moves) == 1 + 7 + 5
    assert all(_prepared_names(p) for p in (reads, moves, write_back)) and insert.startswith(b"kana_")
    assert connection.get_autocommit()
    survivor = EndUser.objects.get(user_id="mrg-1")
    assert not EndUser.objects.filter(pk=bare.pk).exists()
    assert MergeRecord.objects.get(absorbed_id=bare.pk).survivor_id == survivor.pk
    assert (survivor.email, survivor.billing_id) == ("mrgbare-1@example.com", "cus_1")
    assert Event.objects.get(message_id="m-merge-1").user_id == survivor.pk
