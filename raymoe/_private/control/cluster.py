"""What the controller needs from Ray: the :class:`Cluster` protocol (``actors.RayCluster``
on Ray, a fake in unit tests). State machines call actors only through it."""

from __future__ import annotations

from typing import Any, Protocol


class ActorUnreachable(Exception):
    """An actor did not answer: it is dead, restarting, or slower than the call's timeout.
    The one failure a controller expects from a call; any other error is a bug or the
    actor's own (typed) refusal."""


class Cluster(Protocol):
    def shard(self, index: int) -> Any: ...  # get or create the named shard actor
    def router(self, index: int) -> Any: ...  # get or create the named router actor
    def spare(self, index: int) -> Any: ...  # get or create a named spare shard actor
    def put(self, value: Any) -> Any: ...  # an object ref owned by the controller

    async def call(self, handle: Any, method: str, *args, timeout: float | None = None) -> Any:
        """``handle.method(*args)``; raises :class:`ActorUnreachable` when it does not
        answer in ``timeout`` s, and a raymoe error as itself."""
        ...

    def kill(self, handles: list) -> None: ...
    def alive(self, handles: list) -> list[bool]: ...  # each actor's process is up (no call)
    def nodes(self) -> list[str]: ...  # ids of the alive nodes
    def memory_bytes(self) -> int: ...  # memory of the alive nodes, for tasks and actors
    def gateway(self, key: str, node: str | None) -> Any: ...  # get or create, on ``node``
