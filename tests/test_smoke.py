"""The project's outer promises: health probes and the create_workspace command."""

from io import StringIO

from django.core.management import call_command

from kana.models import ApiKey, Workspace


def test_it_answers_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_it_reports_ready_when_the_database_answers(client, db):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"


def test_create_workspace_prints_a_working_key(db, client):
    out = StringIO()
    call_command("create_workspace", "Globex", stdout=out)
    key = out.getvalue().split("store it now): ")[1].strip()
    assert key.startswith("prv_live_") and len(key) == len("prv_live_") + 32
    workspace = Workspace.objects.get(name="Globex")
    stored = ApiKey.objects.get(workspace=workspace)
    assert key not in stored.key_hash and stored.prefix == key[:13]
    response = client.post(
        "/v1/identify", {"userId": "u1"}, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}"
    )
    assert response.status_code == 200, response.content
