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
import threading
import warnings

import numpy as np
import ray
import ray._private.state
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe._private.control.cluster import ActorUnreachable
from raymoe._private.control.controller import Controller
from raymoe._private.control.goal import Goal
from raymoe._private.control.roster import layout_of
from raymoe._private.data.router import Router
from raymoe._private.data.shard import ExpertShard
from raymoe._private.data.transport import GrpcShardCalls, serve_shard
from raymoe._private.metrics import RayMetrics
from raymoe.config import PoolSpec
from raymoe.errors import (
    PlacementMismatchError,
    PoolUnavailableError,
    RaymoeError,
    ShardNotReadyError,
)
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

# NOTE: arrays arrive read-only from the object store; raymoe never writes into them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
# NOTE: a shard's expert copies (reserve, place, export) run on their own thread, so that
# sub-batches (the default group, one thread) keep running while a copy builds a grown bank
SHARD_GROUPS = {"copy": 1}


def actor_name(pool: str, role: str, index: int | str = 0) -> str:
    return f"{pool}:{role}:{index}"


def _device(spec: PoolSpec) -> str:
    return "cuda" if spec.shards.device == "cuda" or spec.shards.num_gpus > 0 else "cpu"


class ShardActor(ExpertShard):
    """A shard; expert copies run in their own concurrency group (:data:`SHARD_GROUPS`), so
    sub-batches run while a copy builds a grown bank. With the ``grpc`` transport it also
    serves its own gRPC endpoint, whose thread computes under the same lock.

    NOTE: two locks. ``_lock`` guards the bank in service (compute, and every change to it,
    each one short); ``_mutating`` serializes the changes, so the slow part of a copy (a grown
    bank, seeded rows) is built outside ``_lock`` from a bank nobody else changes meanwhile.
    """

    def __init__(self, spec: PoolSpec, shard_id: int, env: dict[str, str] | None = None):
        torch.set_num_threads(spec.shards.shard_threads)
        super().__init__(spec, shard_id, device=_device(spec))
        self._lock = threading.RLock()  # configure() calls mark_ready()
        self._mutating = threading.Lock()
        self._server, self._endpoint = None, None
        if spec.shards.transport == "grpc":
            host = ray.util.get_node_ip_address()
            self._server, self._endpoint = serve_shard(self, self._lock, spec, host)
        self.loading, self.loaded_by = False, "controller"
        if shard_id >= 0 and _reconstructed():  # restarted by Ray: reload, not waiting for
            # the controller (a spare, shard_id < 0, starts empty)
            self.loading = True
            threading.Thread(target=self._reload, args=(env or {},), daemon=True).start()

    def _reload(self, env: dict[str, str]) -> None:
        """Load this shard's experts as the saved goal places them (the placement and the
        change being applied), their rows from the goal's weight files. The controller
        may be down too; if the goal cannot be read here (an embedded store on another
        node), the controller configures the shard when it sees it."""
        try:
            goal = Goal.load(open_store({**os.environ, **env}), self.spec.name)
            layout = layout_of(goal, self.shard_id)
            self.configure(layout, None, True, goal.spec, list(goal.sources))
            self.loaded_by = "self"
            log.info("shard %d reloaded itself: %d experts", self.shard_id, (layout >= 0).sum())
        except Exception as e:
            log.warning(
                "shard %d could not reload itself (%s); the controller will", self.shard_id, e
            )
        finally:
            self.loading = False

    def status(self):
        node = ray.get_runtime_context().get_node_id()
        return {
            **super().status(),
            "loading": self.loading,
            "loaded_by": self.loaded_by,
            "node": node,
        }

    def endpoint(self) -> str | None:
        return self._endpoint

    def compute(self, x, local_ids, weights, digest=None):
        with self._lock:
            try:
                return super().compute(x, local_ids, weights, digest)
            except PlacementMismatchError as e:
                if self.mismatches & (self.mismatches - 1) == 0:  # the 1st, 2nd, 4th, ...
                    log.warning("%s (%d so far)", e, self.mismatches)
                raise

    def configure(self, expert_ids, rows=None, ready=True, spec=None, files=None):
        with self._mutating, self._lock:
            super().configure(expert_ids, rows, ready, spec, files)

    def restore(self, global_ids, rows):
        with self._mutating, self._lock:
            super().restore(global_ids, rows)

    def _check_loaded(self) -> None:
        """A copy into a shard that restarted and has not loaded its experts yet would be
        lost (or meet no bank): refused, the controller tries again."""
        if not self.ready:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")

    def mark_ready(self):
        with self._lock:
            super().mark_ready()

    @ray.method(concurrency_group="copy")
    def place(self, local, global_ids, rows=None, spec=None):
        self.spec = spec or self.spec
        local = torch.as_tensor(np.asarray(local), dtype=torch.int64)
        gid = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        if not len(local):
            return
        with self._mutating:
            self._check_loaded()
            size = self.size_for(local)
            grown = self._grown(size) if size else None  # outside _lock: computes go on
            tensors = self.rows_for(gid, rows)
            with self._lock:
                if grown is not None:
                    self._adopt(*grown)
                super().place(local, gid, tensors)

    @ray.method(concurrency_group="copy")
    def reserve(self, places: int) -> None:
        with self._mutating:
            self._check_loaded()
            grown = self._grown(places) if places > len(self.expert_ids) else None
            if grown is not None:
                with self._lock:
                    self._adopt(*grown)

    def free(self, local):
        with self._mutating, self._lock:
            super().free(local)

    @ray.method(concurrency_group="copy")
    def export_experts(self, global_ids):
        with self._lock:
            return super().export_experts(global_ids)

    @ray.method(concurrency_group="copy")
    def write_rows(self, file, global_ids):
        with self._mutating:  # the bank holds still; sub-batches go on (they only read it)
            return super().write_rows(file, global_ids)


def _reconstructed() -> bool:
    with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


class RouterActor(Router):
    """An asyncio actor: thousands of concurrent forward calls wait in its bounded queue."""

    def __init__(self, spec: PoolSpec, index: int):
        torch.set_num_threads(spec.shards.router_threads)
        super().__init__(spec, RayMetrics(spec.name), index)

    def configure_pool(
        self, shard_handles: list, placement, weights=None, spec=None, routing_version: int = 0
    ) -> None:
        self.configure(
            shard_calls(spec or self.spec, list(shard_handles)),
            placement,
            weights,
            spec,
            routing_version,
        )


class RayShardCalls:
    """:class:`raymoe._private.data.router.ShardCalls` over Ray actor calls: numpy arrays
    through the object store."""

    def __init__(self, handles: list):
        self.handles = handles

    async def compute(self, shard, x, local_ids, weights, digest):
        return await self.handles[shard].compute.remote(x, local_ids, weights, digest)

    async def forget(self, shard: int) -> None:
        """Nothing to drop: each call takes ``handles[shard]`` as it is then."""

    def retryable(self, error: BaseException) -> bool:
        return shard_down(error)


def shard_down(error: BaseException) -> bool:
    """Whether a shard call failed because the shard is down or reloading."""
    if isinstance(error, ray.exceptions.RayActorError | ray.exceptions.ObjectLostError):
        return True
    return isinstance(error, ray.exceptions.RayTaskError) and isinstance(
        error.as_instanceof_cause(), ShardNotReadyError
    )


def shard_calls(spec: PoolSpec, handles: list):
    """The transport ``spec.shards.transport`` names, to the shards ``handles``."""
    if spec.shards.transport == "grpc":
        return GrpcShardCalls(spec, handles, lambda h: h.endpoint.remote(), shard_down)
    return RayShardCalls(handles)


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
        self._recovering = _reconstructed()
        self._started = asyncio.Event()
        if self._recovering:  # NOTE: resume now, not on the first call someone makes: until
            # it does, restarted routers wait unconfigured and no spare stands in
            ray.get_runtime_context().current_actor.resume.remote()

    async def resume(self) -> None:
        """Recover after a restart (a call to itself, queued by the constructor)."""
        await self._ensure()

    async def _ensure(self) -> None:
        if self._recovering and not self._started.is_set():
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
