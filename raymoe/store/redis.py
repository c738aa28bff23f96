"""The Redis metadata store: a pool's state outlives its Ray cluster.

Keys live under ``{prefix}{pool}/...`` (default prefix ``raymoe:``): the goal as one value
(written whole, so a reader never sees half of a change) and the audit log as a capped list.
Every call is bounded (connect and socket timeouts, no retries): when Redis is down a call
fails within about a second with :class:`~raymoe.errors.StoreUnavailableError`, so admin
calls fail fast while serving, which never touches the store, goes on.

Run Redis with ``appendonly yes`` and ``maxmemory-policy noeviction``: an evicted goal key
is a lost pool.
"""

from __future__ import annotations

import contextlib
import urllib.parse

import redis

from raymoe.errors import ConfigError, StoreUnavailableError
from raymoe.store import AUDIT_KEEP, MetadataStore

TIMEOUT_S = 1.0  # connect and socket timeout of every call
SCAN_COUNT = 1000


class RedisStore(MetadataStore):
    def __init__(self, url: str, password: str | None = None, prefix: str = "raymoe:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"RAYMOE_REDIS_URL must be a redis:// or rediss:// URL, got {_safe(url)!r}"
            )
        self.url, self.prefix = url, prefix
        self._client = redis.Redis.from_url(
            url,
            password=password or parsed.password,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry_on_timeout=False,
            health_check_interval=0,
        )

    def describe(self) -> str:
        return f"redis ({_safe(self.url)})"

    @contextlib.contextmanager
    def _errors(self):
        """Redis errors as :class:`StoreUnavailableError` naming the store."""
        try:
            yield
        except redis.AuthenticationError as e:
            raise StoreUnavailableError(
                f"Redis at {_safe(self.url)} refused the credentials "
                f"(set RAYMOE_REDIS_PASSWORD): {e}"
            ) from None
        except redis.RedisError as e:
            raise StoreUnavailableError(
                f"the metadata store (Redis at {_safe(self.url)}) is unreachable: "
                f"{type(e).__name__}: {e}"
            ) from None

    def get(self, key):
        with self._errors():
            return self._client.get(self.prefix + key)

    def put(self, key, value):
        with self._errors():
            self._client.set(self.prefix + key, bytes(value))

    def delete(self, key):
        with self._errors():
            self._client.delete(self.prefix + key)

    def keys(self, prefix=""):
        pattern = _glob_escape(self.prefix + prefix) + "*"
        with self._errors():
            found = list(self._client.scan_iter(match=pattern, count=SCAN_COUNT))
        return sorted(k.decode()[len(self.prefix) :] for k in found)

    def append(self, key, entry, keep=AUDIT_KEEP):
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.rpush(self.prefix + key, bytes(entry))
            pipe.ltrim(self.prefix + key, -keep, -1)
            pipe.execute()

    def tail(self, key, n=100):
        if n <= 0:
            return []
        with self._errors():
            return list(self._client.lrange(self.prefix + key, -n, -1))

    def ping(self):
        with self._errors():
            self._client.ping()


def _safe(url: str) -> str:
    """``url`` without its password."""
    p = urllib.parse.urlparse(url)
    if p.password is None:
        return url
    return p._replace(netloc=p.netloc.replace(f":{p.password}@", ":***@")).geturl()


def _glob_escape(s: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in s)
