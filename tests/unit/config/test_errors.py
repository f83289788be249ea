"""ConfigError: one ``path: message`` line per problem, survives pickling, never empty."""

from __future__ import annotations

import pickle

import pytest

from gateway.config.errors import DOCUMENT, ConfigError, Problem


def test_str_is_one_line_per_problem() -> None:
    err = ConfigError([Problem("service", "required"), Problem("routes[0].timeout", "must be > 0")])
    assert str(err) == "service: required\nroutes[0].timeout: must be > 0"
    assert err.problems == (Problem("service", "required"), Problem("routes[0].timeout", "must be > 0"))


def test_problem_str() -> None:
    assert str(Problem(DOCUMENT, "the document is empty")) == "(document): the document is empty"


def test_pickle_round_trip_keeps_problems() -> None:
    err = ConfigError([Problem("a", "b")])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems
    assert str(again) == "a: b"


def test_needs_a_problem() -> None:
    with pytest.raises(ValueError, match="at least one problem"):
        ConfigError([])


def test_problem_is_frozen() -> None:
    problem = Problem("a", "b")
    with pytest.raises(AttributeError):
        problem.path = "c"  # type: ignore[misc]
