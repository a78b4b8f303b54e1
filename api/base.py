"""The one base class of every REST endpoint: its rows are the calling workspace's rows."""

import threading

from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from kana.services import key_prefix

from .errors import DOMAIN_ERRORS, DomainError
from .ids import ID_PATTERN, MAX_ID


class Pagination(PageNumberPagination):
    """``{"count", "next", "previous", "results"}``; ``page_size`` from 1 to 500."""

    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request):
        # DRF falls back to the default size for a page_size it cannot read (``2.5``, ``x``)
        # and clamps a large one: the client would get a page it did not ask for. Refused.
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.max_page_size):
            raise ValidationError({self.page_size_query_param: f"a whole number from 1 to {self.max_page_size}"})
        return int(raw)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"].update(minimum=1, maximum=self.max_page_size)
            elif parameter["name"] == self.page_query_param:
                parameter["schema"]["minimum"] = 1
        return parameters


class WorkspaceViewSet(GenericViewSet):
    """Every API endpoint derives from this class.

    ``get_queryset`` starts from ``model.objects.for_workspace(<the key's workspace>)`` and
    only lets subclasses narrow it (``scope``), so another workspace's rows are never listed
    and their ids answer 404 exactly like ids that do not exist. Service errors become 400
    ``{"code", "message", "field"}``.
    """

    model = None
    lookup_value_regex = ID_PATTERN
    pagination_class = Pagination
    parser_classes = [JSONParser]

    @property
    def workspace(self):
        return self.request.workspace

    @property
    def actor(self) -> str:
        """Who is acting, as the audit log names it: ``api-key:<the key's prefix>``."""
        return f"api-key:{key_prefix(self.request.auth)}"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            # drf-spectacular inspects views without a request: no workspace, no rows.
            return self.model.objects.none()
        return self.scope(self.model.objects.for_workspace(self.workspace))

    def scope(self, queryset):
        """Narrow, annotate or order the workspace's rows for this endpoint; never widen."""
        return queryset

    def get_object(self):
        if self.lookup_value_regex == ID_PATTERN and int(self.kwargs[self.lookup_field]) > MAX_ID:
            raise NotFound("no such object")
        return super().get_object()

    def handle_exception(self, exc):
        if isinstance(exc, DOMAIN_ERRORS):
            exc = DomainError.from_service(exc)
        return super().handle_exception(exc)

    def query(self, serializer_class) -> dict:
        """The request's query parameters, validated: a bad one is a 400 naming it.

        A plain dict, not the QueryDict: DRF reads a QueryDict like an HTML form, where an
        empty optional field counts as absent, so ``?user_id=`` (documented as a non-empty
        string) listed everyone instead of being refused.
        """
        return validated_query(serializer_class, self.request.query_params.dict())

    def body(self, serializer_class, *, partial: bool = False) -> dict:
        """The request body, validated: a bad field is a 400 naming it."""
        body = serializer_class(data=self.request.data, partial=partial, context=self.get_serializer_context())
        body.is_valid(raise_exception=True)
        return body.validated_data

    def paginated(self, rows, serializer_class, *, context_for_page=None) -> Response:
        """One page of ``rows`` (a queryset or a list) as ``{"count", "next", "previous", "results"}``.

        ``context_for_page(page)`` loads what the page's rows need in one go (no query per row).
        """
        page = list(self.paginate_queryset(rows))
        context = {**self.get_serializer_context(), **(context_for_page(page) if context_for_page else {})}
        return self.get_paginated_response(serializer_class(page, many=True, context=context).data)


def validated_query(serializer_class, params: dict) -> dict:
    """Query parameters (a plain dict) validated by ``serializer_class``: a bad one raises the
    ValidationError that answers 400 naming it; empty optional values are dropped."""
    return {name: value for name, value in validated(serializer_class, params).items() if value not in (None, "")}


_serializers = threading.local()  # one instance per serializer class and thread, see ``validated``


def validated(serializer_class, data) -> dict:
    """``data`` validated by ``serializer_class``, as ``serializer_class(data=data)`` and
    ``is_valid(raise_exception=True)`` validate it (the same DRF code, the same errors), for a
    serializer used without context.

    The instance is kept per class and thread and given each request's data: building a
    serializer deep-copies its declared fields, which cost 100-300 µs on the entitlement
    check and consume, more than the rest of their edge. Only the per-validation state is
    reset (``initial_data`` and what ``is_valid`` caches)."""
    cache = _serializers.__dict__
    serializer = cache.get(serializer_class)
    if serializer is None:
        serializer = cache[serializer_class] = serializer_class()
    for state in ("_validated_data", "_errors", "_data"):
        serializer.__dict__.pop(state, None)
    serializer.initial_data = data
    try:
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data
    finally:
        del serializer.initial_data  # the request's data is not kept past it
