"""One local Ray cluster for the whole integration session."""

from __future__ import annotations

import pytest
import ray

import raymoe
from raymoe import MoELayer
from tests.helpers import free_port
from tests.integration.gateway_common import ADMIN, DATA, gateway_spec


@pytest.fixture(scope="session")
def metrics_port():
    """The port of the session's Prometheus endpoint (Ray's metrics agent)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port):
    ray.init(
        num_cpus=4,
        namespace="raymoe",
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},  # scraped values settle fast
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokens(tmp_path_factory):
    """Files holding the data-plane and admin-plane tokens (as a mounted Secret would)."""
    d = tmp_path_factory.mktemp("tokens")
    (d / "data").write_text(DATA + "\n")
    (d / "admin").write_text(ADMIN + "\n")
    return d


@pytest.fixture(scope="session")
def served(ray_cluster, tokens):
    """One pool with its gateway for the gateway tests: (handle, endpoint, MoELayer)."""
    spec = gateway_spec("gw", tokens)
    pool = raymoe.serve(spec)
    (endpoint,) = pool.gateways()
    yield pool, endpoint, MoELayer(spec)
    pool.shutdown()
