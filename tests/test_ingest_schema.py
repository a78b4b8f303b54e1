"""Segment's endpoints in the OpenAPI schema (/api/schema/), so /api/docs/ shows the whole API.

schemathesis checks the answers against these descriptions in tests/test_api_schema.py.
"""

import pytest

from .test_api_schema import INGEST_ENDPOINTS, openapi


@pytest.fixture
def schema(client, db) -> dict:
    return openapi(client)


def test_every_ingest_endpoint_is_described_with_its_request_and_answers(schema):
    assert INGEST_ENDPOINTS <= set(schema["paths"])
    for path in INGEST_ENDPOINTS:
        operations = schema["paths"][path]
        assert set(operations) == {"post"}, path
        post = operations["post"]
        assert post["tags"] == ["Segment ingest"]
        assert post["requestBody"]["content"]["application/json"]["examples"], "an example for the docs page"
        assert set(post["responses"]) == {"200", "400", "401", "405", "413", "429", "503"}, path
        for status in ("400", "401", "405", "413", "429", "503"):
            body = post["responses"][status]["content"]["application/json"]["schema"]
            assert body["$ref"].endswith("/IngestError"), (path, status)
        for status in ("429", "503"):
            assert post["responses"][status]["headers"]["Retry-After"]["required"] is True


def test_the_request_bodies_say_what_each_call_needs(schema):
    components = schema["components"]["schemas"]

    def body(path: str) -> dict:
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[1]]

    assert body("/v1/identify")["required"] == ["userId"]
    assert body("/v1/identify")["properties"]["traits"]["allOf"][0]["$ref"].endswith("/IdentifyTraits")
    assert set(body("/v1/track")["required"]) == {"userId", "event"}
    assert set(body("/v1/alias")["required"]) == {"userId", "previousId"}
    assert set(body("/v1/group")["required"]) == {"userId", "groupId"}
    assert body("/segment/events")["required"] == ["type"]
    batch = body("/v1/batch")
    assert batch["required"] == ["batch"] and batch["properties"]["batch"]["maxItems"] == 2500
    assert body("/v1/import") == batch
    assert body("/v1/track")["properties"]["messageId"]["maxLength"] == 100


def test_the_answers_are_the_shapes_the_views_send(schema):
    components = schema["components"]["schemas"]
    assert set(components["IngestAccepted"]["properties"]) == {"success", "message_id", "status", "reason", "warnings"}
    batch = {"success", "accepted", "duplicates", "rejected", "pending", "suppressed"}
    assert set(components["IngestBatchAccepted"]["properties"]) == batch
    assert set(components["IngestError"]["required"]) == {"success", "code", "message"}


def test_the_ingest_endpoints_use_segment_s_basic_auth(schema):
    scheme = schema["components"]["securitySchemes"]["SegmentWriteKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "basic"
    assert "writeKey" in scheme["description"] and "X-Signature" in scheme["description"]
    for path in INGEST_ENDPOINTS:
        assert schema["paths"][path]["post"]["security"] == [{"SegmentWriteKey": []}], path
