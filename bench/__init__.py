"""The benchmark harness: ``python bench/run.py`` (see docs/performance.md)."""
