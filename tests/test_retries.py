"""kana.retries: bounded re-runs, outermost loop only, and a clear end when they run out."""

import pytest

from kana.retries import MAX_ATTEMPTS, ConcurrentChange, RetriesExhausted, run_with_retries


def test_it_retries_a_concurrent_change_then_returns_the_result():
    attempts = []

    def operation():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConcurrentChange()
        return "done"

    assert run_with_retries(operation) == "done"
    assert len(attempts) == 3


def test_it_ends_in_retries_exhausted_not_the_last_database_error():
    attempts = []

    def operation():
        attempts.append(1)
        raise ConcurrentChange()

    with pytest.raises(RetriesExhausted):
        run_with_retries(operation)
    assert len(attempts) == MAX_ATTEMPTS


def test_a_nested_retry_loop_runs_once_and_the_outer_loop_re_runs_everything():
    outer, inner = [], []

    def inner_operation():
        inner.append(1)
        if len(inner) == 1:
            raise ConcurrentChange()
        return "inner"

    def outer_operation():
        outer.append(1)
        return run_with_retries(inner_operation)

    assert run_with_retries(outer_operation) == "inner"
    assert (len(outer), len(inner)) == (2, 2)  # not 6 x 6 attempts


def test_an_error_that_is_not_a_race_is_not_retried():
    attempts = []

    def operation():
        attempts.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_with_retries(operation)
    assert len(attempts) == 1
