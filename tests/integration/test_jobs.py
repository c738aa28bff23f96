"""Ray job submission end to end, as an operator does it: a Ray head of its own started with
``ray start --head`` (dashboard and job server), ``raymoe submit``, the pool reached with
``raymoe.Client`` and ``raymoe status``, ``ray job stop``, and the pool gone."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import raymoe
from raymoe import MoELayer
from tests.helpers import free_port
from tests.integration.gateway_common import DATA, gateway_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def head():
    """A Ray head with its job server on free ports; -> the job server's address. Torn
    down at the end (its own processes only: never ``ray stop``, which stops every cluster
    on the machine)."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # NOTE: short: socket paths live here
    dashboard = free_port()
    argv = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--num-cpus",
        "4",
        "--temp-dir",
        temp,
        "--port",
        str(free_port()),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--metrics-export-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        # NOTE: the job agent's HTTP port is fixed (52365) by default; the session's cluster
        # holds it, and a second agent that can't bind it never registers ("No available
        # agent to submit job")
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
    ]
    # NOTE: no drain on SIGTERM (Ray waits up to 30 s by default): tear down at once
    env = _env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    proc = subprocess.Popen(
        argv, cwd=temp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _until(lambda: _answers(f"{address}/api/version") or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stdout.read()
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # 401: token auth is on; the server is up
    except OSError:
        return False
    return True


def _until(ok, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.5)


def _job(head: str, verb: str, job_id: str) -> str:
    """``ray job VERB`` of ``job_id``: what it printed (Ray's CLI logs to stderr)."""
    done = _run("ray", "job", verb, "--address", head, job_id, timeout=60)
    return done.stdout + done.stderr


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # Ray turns token auth on for a local head; clients say so, as for `ray job submit`
    env = _env(RAY_AUTH_MODE="token")
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_serve_reach_stop(head, tokens, tmp_path):
    spec = gateway_spec("job-pool", tokens)
    config = tmp_path / "pool.yaml"
    config.write_text(spec.to_yaml())
    raymoe_cli = (sys.executable, "-m", "raymoe")
    submitted = _run(*raymoe_cli, "submit", "-c", str(config), "--address", head, "--wait", "240")
    assert submitted.returncode == 0, submitted.stderr[-3000:] + submitted.stdout[-3000:]
    lines = submitted.stdout.splitlines()
    (endpoint,) = [ln.split()[3].rstrip(":") for ln in lines if ln.startswith("gRPC gateway on")]
    (stop,) = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("stop (tears")]
    job_id = stop.split()[-1]

    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = MoELayer(spec)(x)
    with raymoe.Client(endpoint, token=DATA) as client:
        assert (client.forward(x) - want).abs().max() <= 1e-5
    status = _run(
        *raymoe_cli,
        "status",
        "--target",
        endpoint,
        "--token-file",
        str(tokens / "admin"),
        "-o",
        "json",
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    described = json.loads(status.stdout)
    assert described["pool"]["name"] == "job-pool" and described["pool"]["shards"] == 2

    stopped = _run(*shlex.split(stop), timeout=120)  # the command `raymoe submit` printed
    assert stopped.returncode == 0, stopped.stderr
    _until(lambda: "was stopped" in _job(head, "status", job_id), 60)
    logs = _job(head, "logs", job_id)
    assert "pool 'job-pool' shut down" in logs  # SIGTERM tore the pool down
    listed = _run("ray", "list", "actors", "--address", head, "--format", "json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    ours = [a for a in json.loads(listed.stdout) if (a.get("name") or "").startswith("job-pool:")]
    assert len(ours) >= 4 and {a["state"] for a in ours} == {"DEAD"}, ours
    with (
        raymoe.Client(endpoint, token=DATA, retries=1, timeout_s=5) as client,
        pytest.raises(raymoe.PoolUnavailableError),
    ):
        client.forward(np.zeros((1, 16), np.float32))


def test_submit_refuses_without_a_job_server_and_with_a_bad_spec(tmp_path):
    config = tmp_path / "pool.yaml"
    address = f"http://127.0.0.1:{free_port()}"
    submit = (sys.executable, "-m", "raymoe", "submit", "-c", str(config), "--address", address)
    config.write_text("name: x\nexperts: {count: -1}\n")
    bad = _run(*submit, timeout=60)
    assert bad.returncode == 2 and "error" in bad.stderr
    config.write_text(gateway_spec("nowhere", tmp_path).to_yaml())
    gone = _run(*submit, timeout=60)
    assert gone.returncode == 3 and "no Ray job server" in gone.stderr
