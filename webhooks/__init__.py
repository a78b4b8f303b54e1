"""Webhooks: notifications (``kana.signals.notification``, merges) turned into signed deliveries."""
