"""What users tells the layers above about a user, without importing them.

A merge moves the absorbed user's events and usage, which belong to ``features`` (the one
writer of both), and an unmerge moves some back: ``features`` connects its receivers in
``FeaturesConfig.ready``. Receivers
run inside the merge's transaction, so the move commits or rolls back with it.
"""

from django.dispatch import Signal

# Sent once per absorbed user, before its row is deleted: kwargs workspace_id, absorbed_pk, survivor_pk.
# A receiver returns the statements that move what it owns (a list of kana.db.pipelined.Step,
# positional parameters): the merge sends them in its own message, in order, before the
# absorbed user's row goes, so every layer's moves cost one round trip together. The merge's
# ledger row (MergeRecord) is that message's first statement: a step's ``then`` can read it.
# A receiver may also do its work itself and return None (a round trip of its own per
# statement); it runs before that message, so it sees neither the ledger row nor the moves.
user_absorbed = Signal()

# Sent when a user is deleted, its row locked, before the delete: kwargs workspace_id, user_pk,
# keep_events. keep_events True: its events and usage stay, detached and anonymised (feature
# totals unchanged); False: they are deleted.
user_deleting = Signal()

# Sent once per undone merge, after the restored user's row and userIds are back: kwargs
# workspace_id, restored_pk, survivor_pk, user_ids (the userIds the restored user got back;
# the events addressed to them go back with their usage).
user_restored = Signal()
