"""Test tiers: unit (no Ray), integration (one shared local Ray cluster), gpu (needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.redis_server import RedisServer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (append-only, noeviction, a password)."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
