"""The slow tier: runs of minutes to hours (a straight-through sweep, an RLlib CQL trial, the full-size hopper
suite, the shipped medium-replay logs regenerated bitwise, a real three-node Ray cluster). Every test here is
marked ``slow``, so the default suite (``addopts = -m 'not slow'``) skips the folder; run it by hand with
``python -m pytest -m slow tests/slow``. The tests that start Ray carry the ``ray`` marker as well."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)
