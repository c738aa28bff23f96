"""The journal: every write of a controller to its metadata store.

- The goal, saved whole. Before a side effect, a save that fails raises
  :class:`~raymoe.errors.StoreUnavailableError` (nothing was done: the caller fails fast).
  After one, the change happened: the goal is kept in memory, saved again on every update
  pass until the store is back, and the pool reports itself degraded meanwhile.
- The admin audit log (``{pool}/audit``), one JSON line per change; entries wait in a
  bounded backlog while the store is down.
"""

from __future__ import annotations

import collections
import json
import logging
import time

from raymoe._private.control.goal import Goal
from raymoe.errors import StoreUnavailableError
from raymoe.store import MetadataStore

log = logging.getLogger(__name__)
AUDIT_BACKLOG = 1000  # audit entries kept in memory while the store is down


class Journal:
    def __init__(self, store: MetadataStore, pool: str):
        self.store, self.pool = store, pool
        self.unsaved: Goal | None = None  # a goal the store has not got yet
        self._backlog: collections.deque[bytes] = collections.deque(maxlen=AUDIT_BACKLOG)

    def save(self, goal: Goal, strict: bool = True) -> None:
        """Save ``goal``: ``strict`` before side effects (an outage raises), otherwise
        after them (an outage keeps it for :meth:`retry`)."""
        try:
            goal.save(self.store)
            self.unsaved = None
        except StoreUnavailableError as e:
            if strict:
                raise
            if self.unsaved is None:
                log.warning("goal not saved (%s); saving again on every pass", e)
            self.unsaved = goal

    def retry(self, goal: Goal) -> None:
        """Once the store is back: the goal it missed (the current one), the audit backlog."""
        if self.unsaved is not None:
            self.save(goal, strict=False)
        self._flush()

    def problem(self) -> str | None:
        if self.unsaved is None:
            return None
        return (
            f"the metadata store ({self.store.describe()}) is unreachable: the last change "
            "is kept in memory and saved when it is back"
        )

    def audit(self, entry: dict) -> None:
        """Append an admin change to the audit log."""
        self._backlog.append(json.dumps({"time": time.time(), **entry}).encode())
        self._flush()

    def _flush(self) -> None:
        while self._backlog:
            try:
                self.store.append(f"{self.pool}/audit", self._backlog[0])
            except StoreUnavailableError:
                return
            self._backlog.popleft()

    def tail(self, n: int = 20) -> list[dict]:
        """The last ``n`` entries of the audit log, oldest first."""
        return [json.loads(e) for e in self.store.tail(f"{self.pool}/audit", n)]
