"""B-insert: the per-request floor for durable ingest.

A minimal Django view that parses the JSON body and does one INSERT of the event row, nothing
else (no authentication, validation, user resolution or mapping). It is served by the same
gunicorn, worker count, middleware and database settings as the app, so the ratio of a
scenario to it measures what Kana's own work costs.
"""

import json

from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from features.models import Event, EventStatus, UnmappedReason


@csrf_exempt
def insert_event(request, workspace_id: int):
    payload = json.loads(request.body)
    now = timezone.now()
    Event.objects.create(
        workspace_id=workspace_id,
        message_id=payload["messageId"],
        type=payload["type"],
        name=payload.get("event", ""),
        external_user_id=payload.get("userId", ""),
        payload=payload,
        occurred_at=now,
        received_at=now,
        status=EventStatus.UNMAPPED,
        unmapped_reason=UnmappedReason.NO_MATCHING_RULE,
    )
    return JsonResponse({"success": True})
