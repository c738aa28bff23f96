"""The one place where raymoe's plain classes become Ray actors and where Ray is called.

Actor options (name, namespace, resources, lifetime, restarts) are applied here; state machines
and the data path never call ``ray.get`` or ``ray.remote`` themselves.

Every actor of a pool is named ``{pool}:{role}:{index}`` in the ``raymoe`` namespace and is
detached, so the pool outlives the driver that started it and a restarted controller finds its
shards and routers by name. Restart rules:

- shards restart forever; their calls are *not* retried by Ray (``max_task_retries=0``): the
  router retries a failed sub-batch itself, on another replica where there is one;
- routers and the controller restart forever and Ray retries calls to them (a forward pass
  and every controller call is safe to repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import numpy as np
import ray
import ray._private.state
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe._private.control.cluster import ActorUnreachable
from raymoe._private.control.controller import Controller
from raymoe._private.metrics import RayMetrics
from raymoe._private.pool_actors import (
    SHARD_GROUPS,
    RouterActor,
    ShardActor,
    reconstructed,
)
from raymoe.config import PoolSpec
from raymoe.errors import PoolUnavailableError, RaymoeError
from raymoe.reports import OpReport, PoolDescription, PoolStats
from raymoe.store import open_store, store_env

log = logging.getLogger(__name__)
NAMESPACE = "raymoe"
OPERATIONS = (
    "rebalance",
    "replicate",
    "pin",
    "unpin",
    "drain_shard",
    "scale_shards",
    "add_experts",
    "remove_experts",
)


def actor_name(pool: str, role: str, index: int | str = 0) -> str:
    return f"{pool}:{role}:{index}"


class RayCluster:
    """:class:`raymoe._private.controller.Cluster` on Ray: creates and calls pool actors."""

    def __init__(self, spec: PoolSpec, env: dict[str, str] | None = None):
        self.spec, self.env = spec, env or {}

    def _opts(self, role: str, index: int, **extra) -> dict:
        name = actor_name(self.spec.name, role, index)
        return {
            "name": name,
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "get_if_exists": True,
            "max_restarts": -1,
            **extra,
        }

    def _spread(self, index: int):
        """Actor ``index`` of a kind on the alive node ``index`` mod their count. Strict: an
        actor whose node died is dead for good, and the controller starts a new one on an
        alive node (``Roster.revive``). NOTE: Ray's "SPREAD", and soft node affinity, left
        actors that ask for no CPU together on one node."""
        nodes = sorted(self.nodes())  # NOTE: ray.nodes() comes in no fixed order
        if len(nodes) < 2:
            return "DEFAULT"
        return NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=False)

    def shard(self, index: int):
        # failure domains: shards on as many nodes as there are
        return self._shard_actor("shard", index, index, self.spec.shards.min_replicas > 1)

    def spare(self, index: int):
        """A warm spare shard (``shards.spares``): empty until it stands in for a shard."""
        return self._shard_actor("spare", index, -1 - index, spread=False)

    def _shard_actor(self, role: str, index: int, shard_id: int, spread: bool):
        s = self.spec.shards
        gpus = s.num_gpus if s.device != "cpu" else 0.0
        opts = self._opts(role, index, max_task_retries=0, num_cpus=s.num_cpus, num_gpus=gpus)
        if spread:
            opts["scheduling_strategy"] = self._spread(index)
        actor = ray.remote(concurrency_groups=SHARD_GROUPS)(ShardActor)
        return actor.options(**opts).remote(self.spec, shard_id, self.env)

    def alive(self, handles: list) -> list[bool]:
        """Whether each actor's process is up, from the GCS's actor table (a dead or
        restarting actor is known there at once; a call to it would wait for its restart)."""
        table = ray._private.state.state  # NOTE: private; the public state API needs the dashboard
        return [table.actor_table(h._actor_id.hex()).get("State") == "ALIVE" for h in handles]

    def router(self, index: int):
        opts = self._opts(
            "router",
            index,
            max_task_retries=-1,
            num_cpus=0,
            max_concurrency=4 * self.spec.limits.max_queued_requests,
            # one node's failure leaves a router on another (clients hedge to it)
            scheduling_strategy=self._spread(index),
        )
        return ray.remote(RouterActor).options(**opts).remote(self.spec, index)

    def gateway(self, key: str, node: str | None):
        opts = self._opts("gateway", key, num_cpus=0)
        if node is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        from raymoe._private.gateway_actor import GatewayActor  # it imports this module

        return ray.remote(GatewayActor).options(**opts).remote(self.spec)

    def nodes(self) -> list[str]:
        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    def memory_bytes(self) -> int:
        return int(ray.cluster_resources().get("memory", 0))

    def put(self, value):
        return ray.put(value)

    async def call(self, handle, method: str, *args, timeout: float | None = None):
        ref = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except (TimeoutError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise ActorUnreachable(f"{method}(): {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:
            raise raymoe_error(e) from None

    def kill(self, handles: list) -> None:
        kill(handles)


class ControllerActor:
    """The controller as a detached asyncio actor; resumes from the store after a restart."""

    def __init__(self, spec: PoolSpec, env: dict[str, str]):
        store, metrics = open_store({**os.environ, **env}), RayMetrics(spec.name)
        self.controller = Controller(spec, RayCluster(spec, env), store, metrics)
        self._loop: asyncio.Task | None = None
        self._recovering = reconstructed()
        self._recovery: asyncio.Future | None = None
        self._started = asyncio.Event()
        if self._recovering:  # NOTE: resume now, not on the first call someone makes: until
            # it does, restarted routers wait unconfigured and no spare stands in
            ray.get_runtime_context().current_actor.resume.remote()

    async def resume(self) -> None:
        """Recover after a restart (a call to itself, queued by the constructor)."""
        await self._ensure()

    async def _ensure(self) -> None:
        """After a restart: every call waits until the controller has recovered (one
        recovery; a failed one is tried again by the next call)."""
        if not self._recovering:
            return
        if self._recovery is None or (self._recovery.done() and self._recovery.exception()):
            self._recovery = asyncio.ensure_future(self._recover())
        await asyncio.shield(self._recovery)

    async def _recover(self) -> None:
        self._started.set()
        await self.controller.recover()
        self._run()

    def _run(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self.controller.run())

    async def start(self, goal) -> PoolDescription:
        if not self._started.is_set():
            self._started.set()
            await self.controller.start(goal)
            self._run()
        return self.controller.describe()

    async def describe(self) -> PoolDescription:
        await self._ensure()
        return self.controller.describe()

    async def routers(self) -> list:
        await self._ensure()
        return self.controller.routers

    async def stats(self, window_s: float = 60.0, load_bins: int = 0) -> PoolStats:
        await self._ensure()
        return await self.controller.stats(window_s, load_bins)

    async def gateways(self) -> list[str]:
        await self._ensure()
        return self.controller.fleet.endpoints()

    async def save_checkpoint(self, path: str) -> dict:
        await self._ensure()
        return await self.controller.save_checkpoint(path)

    async def grad_square_sum(self) -> float:
        await self._ensure()
        return await self.controller.grad_square_sum()

    async def step(self, optimizer: dict, scale: float = 1.0) -> dict:
        await self._ensure()
        return await self.controller.step(optimizer, scale)

    async def op(self, name: str, *args, **kwargs) -> OpReport:
        """A runtime operation of the controller (one of :data:`OPERATIONS`), recorded in
        the audit log. Fails fast with StoreUnavailableError while the store is down."""
        await self._ensure()
        if name not in OPERATIONS:
            raise ValueError(f"unknown operation {name!r}; valid: {sorted(OPERATIONS)}")
        ctl = self.controller
        ctl.store.ping()
        entry = {"op": name, "args": _loggable(args), "kwargs": _loggable(kwargs)}
        try:
            report = await getattr(ctl, name)(*args, **kwargs)
        except Exception as e:
            ctl.journal.audit({**entry, "error": f"{type(e).__name__}: {e}"})
            raise
        ctl.journal.audit({**entry, "version": report.version})
        return report

    async def audit_log(self, n: int = 20) -> list[dict]:
        await self._ensure()
        return self.controller.journal.tail(n)

    async def shutdown(self) -> None:
        await self._ensure()
        if self._loop is not None:
            self._loop.cancel()
        await self.controller.shutdown()


def _loggable(value):
    """``value`` for the audit log: arrays become their shapes."""
    if isinstance(value, dict):
        return {str(k): _loggable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_loggable(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"array{list(value.shape)}"
    return value if isinstance(value, int | float | str | bool | None) else repr(value)


def start_controller(spec: PoolSpec):
    """Create the pool's controller (a fresh one: an existing pool of that name is an error)."""
    name = actor_name(spec.name, "controller")
    opts = {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": -1,
        "num_cpus": 0,
    }
    return ray.remote(ControllerActor).options(**opts).remote(spec, store_env())


def get_controller(pool: str):
    return ray.get_actor(actor_name(pool, "controller"), namespace=NAMESPACE)


def wait(refs, timeout: float | None = None):
    """``ray.get`` that re-raises a raymoe error as itself (not wrapped in RayTaskError)."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        raise raymoe_error(e) from None


async def wait_async(ref):
    """``await ref``, with the errors of :func:`wait`; a dead actor is PoolUnavailableError."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        raise raymoe_error(e) from None
    except ray.exceptions.RayActorError as e:
        raise PoolUnavailableError(f"a pool actor is not reachable: {type(e).__name__}") from e


def raymoe_error(e: ray.exceptions.RayTaskError) -> BaseException:
    """The raymoe error a task raised, as its own class (Ray wraps it in a dual-class
    instance); any other error stays the RayTaskError."""
    cause = e.as_instanceof_cause()
    if not isinstance(cause, RaymoeError):
        return e
    for cls in type(cause).__mro__:
        if issubclass(cls, RaymoeError) and not issubclass(cls, ray.exceptions.RayTaskError):
            return cls(*cause.args)
    return cause


def kill(handles: list) -> None:
    for h in handles:
        with contextlib.suppress(ValueError):  # already gone
            ray.kill(h, no_restart=True)


def gateways(pool: str) -> list:
    """The gateway actors of ``pool`` (found by name: the controller may be gone)."""
    prefix = actor_name(pool, "gateway", "")
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == NAMESPACE and a["name"].startswith(prefix):
            with contextlib.suppress(ValueError):  # gone meanwhile
                out.append(ray.get_actor(a["name"], namespace=NAMESPACE))
    return out
