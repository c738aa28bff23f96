"""Deploy a pool as a Ray job: ``raymoe serve`` runs as the job's entrypoint on the cluster,
with this raymoe and the spec shipped in its ``runtime_env``, and the job's logs say when the
pool serves and where its gateways listen.

The pool lives as long as the job: stopping the job (``ray job stop``, :func:`stop`, or
deleting a KubeRay ``RayJob``) sends the entrypoint SIGTERM, which tears the pool down. A
driver killed without that signal leaves the pool's detached actors serving;
``raymoe.connect(name).shutdown()`` removes them.

Token auth on the cluster (Ray >= 2.52 turns it on for local clusters) is Ray's own: set
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``) as for
``ray job submit``. The pool's gateway tokens never travel in the runtime env (it is readable
in the job's metadata): the spec names token files on the cluster (a mounted Secret).
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import raymoe
from raymoe.config import PoolSpec
from raymoe.errors import (
    AuthenticationError,
    ConfigError,
    PoolError,
    PoolUnavailableError,
)

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # what `ray job submit` reads
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "pool.yaml"
MAX_WAIT_S = 3600.0
SERVING = re.compile(r"serving pool '([^']+)'")
GATEWAY = re.compile(r"gRPC gateway on (\S+): raymoe")
LOG_TAIL = 4000
NO_AGENT = "No available agent"  # the job server's 500 while its agent starts
NO_AGENT_WAIT_S = 60.0  # an agent that has not come up by then is not starting


@dataclass(frozen=True)
class SubmittedPool:
    """A pool served by a Ray job."""

    job_id: str
    address: str  # the job server's
    pool: str
    gateways: tuple[str, ...]  # "host:port" of each gateway (none unless the spec has one)

    @property
    def stop_command(self) -> str:
        return f"ray job stop --address {self.address} {self.job_id}"


def entrypoint(name: str, gateway: str | None = None, interval_s: float = 10.0) -> str:
    """The job's command: ``raymoe serve`` on the shipped spec, a status line per interval."""
    argv = ["python", "-m", "raymoe", "serve", "-c", SPEC_FILE, "--name", name]
    if gateway:
        argv += ["--gateway", gateway]
    argv += ["--interval", f"{interval_s:g}"]
    return shlex.join(argv)


def runtime_env(spec_dir: str, pip: tuple[str, ...] = ()) -> dict:
    """This raymoe package and the spec (the working directory) for the job; ``pip``: what
    the cluster's image lacks (the Dockerfile in ``deploy/`` has it all)."""
    env: dict = {
        "working_dir": spec_dir,
        "py_modules": [str(Path(raymoe.__file__).parent)],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if pip:
        env["pip"] = list(pip)
    return env


def submit(
    spec: PoolSpec,
    *,
    address: str | None = None,
    name: str | None = None,
    gateway: str | None = None,
    pip: tuple[str, ...] = (),
    wait_s: float = 300.0,
) -> SubmittedPool:
    """Submit a job that serves ``spec``; wait (at most ``wait_s``) until its pool serves.
    A job that fails or does not serve in time is stopped and raises :class:`PoolError`
    with the end of its log."""
    if not 0 < wait_s <= MAX_WAIT_S:
        raise ConfigError(f"wait must be in (0, {MAX_WAIT_S:g}] s, got {wait_s}", "wait")
    name = name or spec.name
    client, address = _client(address)
    with tempfile.TemporaryDirectory(prefix="raymoe-job-") as d:
        Path(d, SPEC_FILE).write_text(spec.to_yaml())
        job_id = _submit_job(
            client,
            address,
            wait_s,
            entrypoint=entrypoint(name, gateway),
            runtime_env=runtime_env(d, pip),
            metadata={"raymoe_pool": name},
        )
    expect_gateway = bool(gateway) or spec.gateway.enabled
    try:
        gateways = _wait_serving(client, address, job_id, name, expect_gateway, wait_s)
    except BaseException:
        _call(address, client.stop_job, job_id)
        raise
    return SubmittedPool(job_id, address, name, gateways)


def stop(job_id: str, *, address: str | None = None, wait_s: float = 60.0) -> str:
    """Stop the job (its pool is torn down); -> its final status."""
    client, address = _client(address)
    _call(address, client.stop_job, job_id)
    end = time.monotonic() + min(wait_s, MAX_WAIT_S)
    while not (status := _call(address, client.get_job_status, job_id)).is_terminal():
        if time.monotonic() > end:
            raise PoolError(f"job {job_id} still {status} after {wait_s:g} s")
        time.sleep(0.5)
    return str(status)


def _submit_job(client, address: str, wait_s: float, **job) -> str:
    """Submit, retrying (within ``wait_s``, at most ``NO_AGENT_WAIT_S``) while the head has no
    job agent yet: a head that has just started answers before its agent registers, and says
    to try again later."""
    end = time.monotonic() + min(wait_s, NO_AGENT_WAIT_S)
    delay = 0.5
    while True:
        try:
            return _call(address, client.submit_job, **job)
        except RuntimeError as e:  # the job server's HTTP errors
            if NO_AGENT not in str(e):
                raise PoolError(f"the Ray job server at {address} refused the job: {e}") from e
            if time.monotonic() + delay > end:
                raise PoolUnavailableError(
                    f"the Ray job server at {address} has no job agent: the head's dashboard "
                    "agent did not start (see dashboard_agent.log on the head; e.g. its port, "
                    "52365 unless --dashboard-agent-listen-port, is taken by another Ray "
                    "cluster on that machine)"
                ) from e
        time.sleep(delay)
        delay = min(2 * delay, 5.0)


def _wait_serving(client, address, job_id, name, expect_gateway, wait_s) -> tuple[str, ...]:
    end = time.monotonic() + wait_s
    while True:
        status = _call(address, client.get_job_status, job_id)
        logs = _call(address, client.get_job_logs, job_id)
        if name in SERVING.findall(logs):
            gateways = tuple(GATEWAY.findall(logs))
            if gateways or not expect_gateway:
                return gateways
        if status.is_terminal():
            raise PoolError(f"job {job_id} ended {status} before serving:\n{logs[-LOG_TAIL:]}")
        if time.monotonic() > end:
            raise PoolError(
                f"job {job_id} did not serve within {wait_s:g} s (stopped):\n{logs[-LOG_TAIL:]}"
            )
        time.sleep(0.5)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    return _call(address, JobSubmissionClient, address), address


def _call(address: str, fn, *args, **kwargs):
    """``fn`` with Ray's client errors as raymoe's."""
    import ray

    try:
        return fn(*args, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise AuthenticationError(
            f"the Ray job server at {address} refused the request: set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as for `ray job submit`"
        ) from e
    except ConnectionError as e:
        raise PoolUnavailableError(f"no Ray job server at {address}: {e}") from e
