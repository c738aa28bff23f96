"""raymoe.jobs' pure parts: the entrypoint, and submitting while the head's job agent starts."""

from __future__ import annotations

import shlex

import pytest

from raymoe import jobs
from raymoe.errors import PoolError, PoolUnavailableError


class FlakyJobServer:
    """Answers like Ray's job server: ``fails`` times 'no agent', then a job id."""

    def __init__(self, fails: int, error: str = "No available agent to submit job"):
        self.fails, self.error, self.calls = fails, error, 0

    def submit_job(self, **job) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            raise RuntimeError(f"Request failed with status code 500: {self.error}")
        return "raysubmit_1"


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)


def test_entrypoint_serves_the_shipped_spec():
    argv = shlex.split(jobs.entrypoint("p", "0.0.0.0:50051"))
    assert argv[:5] == ["python", "-m", "raymoe", "serve", "-c"]
    assert argv[5] == jobs.SPEC_FILE and "--gateway" in argv and "p" in argv


def test_submit_retries_while_the_agent_starts():
    server = FlakyJobServer(fails=3)
    assert jobs._submit_job(server, "http://h:8265", 60.0, entrypoint="x") == "raysubmit_1"
    assert server.calls == 4


def test_submit_gives_up_within_the_wait(monkeypatch):
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    server = FlakyJobServer(fails=10**6)
    with pytest.raises(PoolUnavailableError, match="no job agent"):
        jobs._submit_job(server, "http://h:8265", 30.0, entrypoint="x")
    assert server.calls < 10


def test_a_refused_job_is_not_retried():
    server = FlakyJobServer(fails=1, error="400 invalid runtime_env")
    with pytest.raises(PoolError, match="refused the job"):
        jobs._submit_job(server, "http://h:8265", 60.0, entrypoint="x")
    assert server.calls == 1
