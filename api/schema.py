"""OpenAPI extras: the API key security scheme, the error responses of every operation, and a
generator that also documents Segment's endpoints (plain Django views)."""

from django.urls import URLPattern, URLResolver
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator
from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers

from kana.openapi import COMPONENTS, NOT_BLANK_TEXT_PATTERN, TEXT_PATTERN

from .ids import ID_PATTERN, MAX_ID


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable reason, e.g. `not_found`, `invalid_email`.")
    message = serializers.CharField()
    field = serializers.CharField(required=False, help_text="The field at fault, when there is one.")
    errors = serializers.DictField(required=False, help_text="Every invalid field, for form-like bodies.")

    class Meta:
        ref_name = "Error"


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "prv_live_…",
            "description": (
                "A workspace API key (`prv_live_` + 32 letters and digits): `Authorization: Bearer <key>`. "
                "`Basic base64(<key>:)` and the bare key are accepted too."
            ),
        }


_ERRORS = {
    "400": "Invalid query, body or a request the rules refuse: `code` says which, `field` where.",
    "401": "Missing, unknown or revoked API key.",
    "404": "No such object in this workspace (objects of other workspaces included), or no such page.",
    "405": "Method not allowed on this path.",
    "415": "Unsupported request body media type.",
}


# What DRF's CharField refuses, stated in request schemas: NUL always; text that is only
# whitespace too when the field trims it and may not be blank (kana.openapi).
def _types(schema: dict) -> set:
    kind = schema.get("type")
    return set(kind) if isinstance(kind, list) else {kind}


def text_pattern(field: serializers.CharField) -> str:
    """The pattern a request's text must match for ``field`` to accept it."""
    if field.trim_whitespace and not field.allow_blank:
        return NOT_BLANK_TEXT_PATTERN
    return TEXT_PATTERN


class KanaAutoSchema(AutoSchema):
    """drf-spectacular's schema plus the ``{"code", "message", "field"?}`` errors each operation
    can answer, so clients (and schemathesis) know every status the API may send."""

    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if {"type": "null"} in schema.get("oneOf", []) and {} in schema["oneOf"]:
            # Any JSON value or null is any JSON value (oneOf would refuse null, matched twice).
            del schema["oneOf"]
        is_text = isinstance(field, serializers.CharField) and "string" in _types(schema)
        if direction == "request" and is_text and "pattern" not in schema and "enum" not in schema:
            schema["pattern"] = getattr(field, "schema_pattern", None) or text_pattern(field)
        return schema

    def _insert_field_validators(self, field, schema):
        super()._insert_field_validators(field, schema)
        # drf-spectacular states "or blank" as oneOf [the text, ""]; the text's pattern here
        # admits "" too, and oneOf refuses a value both branches accept: anyOf says it.
        if schema.get("oneOf", [None])[-1:] == [{"type": "string", "maxLength": 0}]:
            schema["anyOf"] = schema.pop("oneOf")

    def _map_basic_serializer(self, serializer, direction):
        # Rules across a request's fields that serializers cannot state (``if``/``then``,
        # ``anyOf``), as the serializer's ``openapi_extra`` says them.
        schema = super()._map_basic_serializer(serializer, direction)
        if direction == "request":
            schema.update(getattr(serializer, "openapi_extra", {}))
        return schema

    def get_tags(self) -> list[str]:
        # /api/v1/<resource>/...: one group per resource on the docs page.
        parts = self.path.strip("/").split("/")
        return [parts[2]] if len(parts) > 2 and parts[:2] == ["api", "v1"] else super().get_tags()

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        for parameter in operation.get("parameters", []):
            # Kana ids in paths are integers; the URL pattern only keeps words like "merge" out.
            if parameter["in"] == "path" and parameter["schema"].get("pattern") == f"^{ID_PATTERN}$":
                parameter["schema"] = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_ID}
        error = {"content": {"application/json": {"schema": self.resolve_serializer(ErrorSerializer, "response").ref}}}
        # A view may say which generic errors apply to it (Segment's endpoints list their own).
        statuses = getattr(self.view, "kana_error_statuses", None)
        if statuses is None:
            statuses = ["400", "401", "404", "405"] + (["415"] if "requestBody" in operation else [])
        for status in statuses:
            operation["responses"].setdefault(status, {"description": _ERRORS[status], **error})
        if getattr(self.view, "request_body_required", False) and "requestBody" in operation:
            operation["requestBody"]["required"] = True
        # A view names the actions that answer 409 when the workspace's state refuses them.
        conflict = getattr(self.view, "kana_conflicts", {}).get(getattr(self.view, "action", None))
        if conflict:
            operation["responses"].setdefault("409", {"description": conflict, **error})
        return operation


# The attribute by which a plain Django view names the APIView that describes it.
OPENAPI_VIEW_ATTRIBUTE = "openapi_view"


class KanaEndpointEnumerator(EndpointEnumerator):
    """DRF's endpoints, plus plain Django views that carry a stand-in ``APIView`` describing
    them (``view.openapi_view``; Segment's endpoints, see ``segment_ingest/schema.py``), at
    their real paths. The stand-in is never routed: only its schema is read."""

    def get_api_endpoints(self, patterns=None, prefix=""):
        endpoints = super().get_api_endpoints(patterns, prefix)
        if patterns is None:  # the whole URL tree, not a nested call
            endpoints += self._described_plain_views(self.patterns, "")
        return endpoints

    def _described_plain_views(self, patterns, prefix: str) -> list:
        found = []
        for pattern in patterns:
            regex = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                found += self._described_plain_views(pattern.url_patterns, regex)
            elif isinstance(pattern, URLPattern) and getattr(pattern.callback, OPENAPI_VIEW_ATTRIBUTE, None):
                stand_in = getattr(pattern.callback, OPENAPI_VIEW_ATTRIBUTE).as_view()
                path = self.get_path_from_regex(regex)
                found += [(path, regex, method, stand_in) for method in self.get_allowed_methods(stand_in)]
        return found


# The attribute by which a stand-in names the components its schema refers to.
OPENAPI_COMPONENTS_ATTRIBUTE = "openapi_components"


class KanaSchemaGenerator(SchemaGenerator):
    """drf-spectacular's generator, with the Segment stand-ins and the components that
    schemas refer to by ``$ref`` (recursive ones, which serializers cannot express)."""

    endpoint_inspector_cls = KanaEndpointEnumerator

    def get_schema(self, request=None, public=False):
        schema = super().get_schema(request, public)
        components = dict(COMPONENTS)
        for _path, _regex, _method, view in self.endpoints or []:
            components.update(getattr(view.cls, OPENAPI_COMPONENTS_ATTRIBUTE, {}))
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return schema
