"""The runtime tier: every test here starts (or joins) Ray, so each carries the ``ray`` marker
(``pytest -m "not ray"`` skips the tier; the edges tier marks its Ray tests one by one)."""

from pathlib import Path

import pytest
import ray

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray for one test module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
