"""Unit tests run without Ray: a unit test that starts it fails (integration tests share one
local cluster; see tests/integration/conftest.py). In a whole-suite run that cluster may
already be up; what a unit test must not do is start (or stop) one itself."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started Ray: put it in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    before = ray.is_initialized()
    yield
    assert ray.is_initialized() == before, "a unit test started or stopped Ray"


@pytest.fixture(autouse=True)
def weights_dir(monkeypatch, tmp_path):
    """Each test's pools keep their weight files in its own directory."""
    monkeypatch.setenv("RAYMOE_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path / "weights"
