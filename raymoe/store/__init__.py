"""Metadata stores: where a pool's controller keeps its goal state.

A store maps string keys to bytes. The controller writes its whole goal state (spec, shard and
router names, placement) under ``{pool}/...`` keys and reads it back when it restarts, so a
restarted controller resumes exactly. ``EmbeddedStore`` (the default) needs no service: it is
a directory of files written atomically; Redis comes later behind the same interface.
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path


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
    """One file per key under ``root``; survives the controller's process (same node)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
