"""The Segment edge keeps no tables of its own: events and usage belong to ``features``.

The app keeps its migrations, the history of the table it once held.
"""
