"""The identity's workspace reference has no database constraint (its user's implies it,
migration 0005): deleting a workspace still deletes its users' identities, through Django."""

import pytest
from django.db import connection

from kana.models import Workspace
from users.models import EndUser, UserIdentity

from .conftest import requires_postgres
from .csv_helpers import identify

pytestmark = pytest.mark.django_db


def test_deleting_a_workspace_deletes_its_users_and_their_identities():
    workspace = Workspace.objects.create(name="gone")
    kept = Workspace.objects.create(name="kept")
    identify(workspace, "u1", email="a@example.com")
    identify(kept, "u1", email="a@example.com")

    workspace.delete()

    assert not EndUser.objects.filter(workspace_id=workspace.pk).exists()
    assert not UserIdentity.objects.filter(workspace_id=workspace.pk).exists()
    assert UserIdentity.objects.filter(workspace=kept).count() == 1


@requires_postgres
def test_workspace_lookups_of_users_and_identities_use_the_composite_indexes(tenant):
    """The single-column workspace indexes are gone: a lookup by workspace alone uses an
    index leading with it."""
    identify(tenant.workspace, "u1", email="a@example.com")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for table in ("users_enduser", "users_useridentity"):
            cursor.execute(f"EXPLAIN SELECT count(*) FROM {table} WHERE workspace_id = %s", [tenant.workspace.pk])
            plan = "\n".join(row for (row,) in cursor.fetchall())
            assert "Index" in plan and "workspace_id_" not in plan, plan
