"""Metadata stores: where a pool's controller keeps its goal state and audit log.

A store maps string keys to bytes, plus bounded append-only logs. The controller writes its
whole goal state (spec with added and removed experts and pins, placement and its version,
where its weights are durable) under ``{pool}/goal`` before it acts, appends every admin
change to ``{pool}/audit``, and reads the goal back when it restarts, so a restarted
controller (or a whole restarted cluster) resumes exactly.

- :class:`EmbeddedStore` (the default) needs no service: a directory of files on one node,
  written atomically (``$RAYMOE_STORE_DIR``, default ``/tmp/raymoe-store``).
- :class:`~raymoe.store.redis.RedisStore`, when ``$RAYMOE_REDIS_URL`` is set (password in
  ``$RAYMOE_REDIS_PASSWORD``): survives the Ray cluster.

:func:`open_store` picks one from the environment. A store that cannot be reached raises
:class:`~raymoe.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path

REDIS_URL_ENV = "RAYMOE_REDIS_URL"
REDIS_PASSWORD_ENV = "RAYMOE_REDIS_PASSWORD"
STORE_DIR_ENV = "RAYMOE_STORE_DIR"
WEIGHTS_DIR_ENV = "RAYMOE_WEIGHTS_DIR"
AUDIT_KEEP = 10_000  # entries kept per pool's audit log


class MetadataStore(ABC):
    """Key -> bytes. Writes are atomic per key; ``get`` of a missing key returns None."""

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]: ...

    def append(self, key: str, entry: bytes, keep: int = AUDIT_KEEP) -> None:
        """Add ``entry`` (one line) to the log ``key``, keeping its last ``keep`` entries."""
        log = self.tail(key, keep - 1)
        self.put(key, b"\n".join([*log, bytes(entry)]))

    def tail(self, key: str, n: int = 100) -> list[bytes]:
        """The last ``n`` entries of the log ``key`` (oldest first)."""
        data = self.get(key)
        return data.split(b"\n")[-n:] if data and n > 0 else []

    def ping(self) -> None:
        """Raise :class:`~raymoe.errors.StoreUnavailableError` unless the store answers."""
        self.get("ping")

    def describe(self) -> str:
        return type(self).__name__


class MemoryStore(MetadataStore):
    """A dict; state is lost with the process (tests, throw-away pools)."""

    def __init__(self):
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._data.get(key)

    def put(self, key, value):
        with self._lock:
            self._data[key] = bytes(value)

    def delete(self, key):
        with self._lock:
            self._data.pop(key, None)

    def keys(self, prefix=""):
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))


class EmbeddedStore(MetadataStore):
    """One file per key under ``root``; survives the controller's process (same node), not
    the node."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"embedded ({self.root})"

    def _path(self, key: str) -> Path:
        return self.root / urllib.parse.quote(key, safe="")

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key, value):
        # NOTE: write a temporary file and rename it: a reader never sees half a value.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix=""):
        names = (urllib.parse.unquote(p.name) for p in self.root.iterdir())
        return sorted(k for k in names if not k.startswith(".tmp-") and k.startswith(prefix))


def store_dir() -> Path:
    """Root of the embedded metadata store (``$RAYMOE_STORE_DIR`` or a temp directory)."""
    return Path(os.environ.get(STORE_DIR_ENV) or Path(tempfile.gettempdir()) / "raymoe-store")


def weights_dir(env: dict[str, str] | None = None) -> Path:
    """Where pools keep the weight files they reload from (``$RAYMOE_WEIGHTS_DIR`` or a temp
    directory): the weights a pool was served with, experts added since its last
    checkpoint, its gate. On a cluster of several nodes, a filesystem every node mounts."""
    env = os.environ if env is None else env
    return Path(env.get(WEIGHTS_DIR_ENV) or Path(tempfile.gettempdir()) / "raymoe-weights")


def open_store(env: dict[str, str] | None = None) -> MetadataStore:
    """The store the environment names: Redis at ``$RAYMOE_REDIS_URL``, else embedded."""
    env = os.environ if env is None else env
    url = env.get(REDIS_URL_ENV)
    if url:
        from raymoe.store.redis import RedisStore

        return RedisStore(url, password=env.get(REDIS_PASSWORD_ENV) or None)
    return EmbeddedStore(env.get(STORE_DIR_ENV) or store_dir())


def store_env() -> dict[str, str]:
    """This process's store settings, for the actors that must use the same store."""
    names = (REDIS_URL_ENV, REDIS_PASSWORD_ENV, STORE_DIR_ENV, WEIGHTS_DIR_ENV)
    return {k: os.environ[k] for k in names if os.environ.get(k)}
