"""A real ``redis-server`` (Debian's package) on a free loopback port, for the tests.

Started as production should run it: ``appendonly yes`` (every write fsynced each second),
``maxmemory-policy noeviction``, a password. ``stop()`` and ``start()`` make an outage; the
append-only file in its directory keeps the data across them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.helpers import free_port

PASSWORD = "test-redis-password"


class RedisServer:
    def __init__(self, root: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
        self.root, self.port = Path(root), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.root), "--appendonly", "yes", "--save", ""]
        args += ["--maxmemory-policy", "noeviction", "--requirepass", PASSWORD]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, password=PASSWORD, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            self.proc.wait(timeout=10)
        self.proc = None

    def env(self) -> dict[str, str]:
        return {"RAYMOE_REDIS_URL": self.url, "RAYMOE_REDIS_PASSWORD": PASSWORD}
