"""Unit tests run without Ray: a test that starts it fails (integration tests share one
local cluster; see tests/integration/conftest.py)."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started Ray: put it in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert not ray.is_initialized(), "a unit test left Ray running"
