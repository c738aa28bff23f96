"""One local Ray cluster for the whole integration session."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=4, namespace="raymoe", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
