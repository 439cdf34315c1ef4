"""The runtime tier: every test here starts (or joins) Ray, so each carries the ``ray`` marker
(``pytest -m "not ray"`` skips the tier; the edges tier marks its Ray tests one by one)."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.ray)
