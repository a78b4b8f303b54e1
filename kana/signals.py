"""Signals that cross layers without an import upward.

``notification`` is how any layer says "tell the workspace's webhook endpoints": the sender
(entitlements' thresholds and subscriptions, for instance) knows nothing about webhooks, and
the ``webhooks`` app turns each notification into signed deliveries. It is sent inside the
transaction that caused it, so a rolled-back change notifies nobody.

Arguments: ``workspace_id`` (int), ``event_type`` (str, e.g. "usage.threshold_reached"),
``data`` (a JSON-serialisable dict, the payload's ``data``), ``event_key`` (str: unique per
workspace and meaning; the same key sent twice is delivered once).
"""

from django.dispatch import Signal

notification = Signal()
