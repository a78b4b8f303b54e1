"""Signals that cross layers without an import upward.

``notification`` is how any layer says "tell the workspace's webhook endpoints": the sender
(entitlements' thresholds and subscriptions, for instance) knows nothing about webhooks, and
the ``webhooks`` app turns each notification into signed deliveries. It is sent inside the
transaction that caused it, so a rolled-back change notifies nobody.

Arguments: ``workspace_id`` (int), ``event_type`` (str, e.g. "usage.threshold_reached"),
``data`` (a JSON-serialisable dict, the payload's ``data``), ``event_key`` (str: unique per
workspace and meaning; the same key sent twice is delivered once).

``thresholds_wanted`` asks which fractions of a budget a workspace wants to hear about
beyond the defaults (``KANA_USAGE_THRESHOLDS``): entitlements sends it with ``workspace_id``
and records a crossing of each fraction any receiver returns (an iterable of numbers); the
``webhooks`` app answers with its endpoints' thresholds, so an endpoint asking for 50 %
is told at 50 %.
"""

from django.dispatch import Signal

notification = Signal()
thresholds_wanted = Signal()
