"""The one base class of every REST endpoint: its rows are the calling workspace's rows."""

from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from kana.services import key_prefix

from .errors import DOMAIN_ERRORS, DomainError
from .ids import ID_PATTERN, MAX_ID


class Pagination(PageNumberPagination):
    """``{"count", "next", "previous", "results"}``; ``page_size`` up to 500."""

    page_size_query_param = "page_size"
    max_page_size = 500


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
        params = serializer_class(data=self.request.query_params.dict())
        params.is_valid(raise_exception=True)
        return {name: value for name, value in params.validated_data.items() if value not in (None, "")}

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
