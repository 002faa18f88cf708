"""Gives student_tests.py its `a2sf_update` argument when you run it with pytest: the function of
the implementation EXERCISE_IMPL selects (your student.py unless it says "solution")."""

import pytest

from exercises import course


@pytest.fixture(scope="session")  # not per test: hypothesis refuses function-scoped fixtures
def a2sf_update():
    return course.implementation(__file__).a2sf_update
