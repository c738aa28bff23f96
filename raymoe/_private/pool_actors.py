"""The data path's actors: a shard (:class:`ShardActor`, with its gRPC endpoint when the
transport is ``grpc``) and a router (:class:`RouterActor`), and the router's transport to
shards over Ray calls. ``ray.remote`` and the actor options are applied in
:mod:`raymoe._private.actors`."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings

import numpy as np
import ray
import torch

from raymoe._private.control.goal import Goal
from raymoe._private.control.roster import fence_of, layout_of
from raymoe._private.data.router import Router
from raymoe._private.data.shard import ExpertShard
from raymoe._private.data.transport import BlockingGrpcShards, GrpcShardCalls, serve_shard
from raymoe._private.metrics import RayMetrics
from raymoe.config import PoolSpec
from raymoe.errors import PlacementMismatchError, ShardNotReadyError
from raymoe.store import open_store

log = logging.getLogger(__name__)
# NOTE: arrays arrive read-only from the object store; raymoe never writes into them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
# NOTE: a shard's expert copies (reserve, place, export) run on their own thread, so that
# sub-batches (the default group, one thread) keep running while a copy builds a grown bank
SHARD_GROUPS = {"copy": 1}


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
        if shard_id >= 0 and reconstructed():  # restarted by Ray: reload, not waiting for
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
            self.fence(fence_of(goal))
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

    def compute(self, x, local_ids, weights, digest=None, keep=None, routing=None):
        with self._lock:
            try:
                return super().compute(x, local_ids, weights, digest, keep, routing)
            except PlacementMismatchError as e:
                if self.mismatches & (self.mismatches - 1) == 0:  # the 1st, 2nd, 4th, ...
                    log.warning("%s (%d so far)", e, self.mismatches)
                raise

    def backward(self, x, local_ids, weights, grad_y, digest=None, keep=None):
        with self._lock:
            return super().backward(x, local_ids, weights, grad_y, digest, keep)

    # Training: gradients and steps (an optimizer step changes the bank in service)

    def expert_grads(self, global_ids):
        with self._lock:
            return super().expert_grads(global_ids)

    def grad_ids(self):
        with self._lock:
            return super().grad_ids()

    def take_grads(self, global_ids):
        with self._lock:
            return super().take_grads(global_ids)

    def add_grads(self, global_ids, rows):
        with self._lock:
            super().add_grads(global_ids, rows)

    def grad_square_sum(self):
        with self._lock:
            return super().grad_square_sum()

    def step(self, optimizer, scale=1.0):
        with self._mutating, self._lock:
            return super().step(optimizer, scale)

    def refresh(self, global_ids, rows):
        with self._mutating, self._lock:
            super().refresh(global_ids, rows)

    def zero_grad(self):
        with self._lock:
            super().zero_grad()

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

    def fence(self, routing_version):
        with self._lock:
            super().fence(routing_version)

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


def reconstructed() -> bool:
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

    async def compute(self, shard, x, local_ids, weights, digest, keep=None):
        return await self.handles[shard].compute.remote(x, local_ids, weights, digest, keep)

    async def backward(self, shard, x, local_ids, weights, grad_y, digest, keep=None):
        handle = self.handles[shard]
        return await handle.backward.remote(x, local_ids, weights, grad_y, digest, keep)

    async def forget(self, shard: int) -> None:
        """Nothing to drop: each call takes ``handles[shard]`` as it is then."""

    def retryable(self, error: BaseException) -> bool:
        return shard_down(error)

    def refused(self, error: BaseException) -> bool:
        return shard_refused(error)


class BlockingRayShards:
    """Compute calls from the caller's own thread (small requests sent straight to the
    shards, :mod:`raymoe._private.direct`) over Ray actor calls."""

    def start(self, handle, x, local_ids, weights, digest: int, routing: int):
        """Send one sub-batch, gated under routing version ``routing`` -> the pending call
        (for :meth:`results`)."""
        return handle.compute.remote(x, local_ids, weights, digest, None, routing)

    def results(self, calls: list, timeout_s: float) -> list:
        """The calls' outputs, in order; the first failure (or ``timeout_s`` passing) raises."""
        end = time.monotonic() + timeout_s
        try:
            return ray.get(calls, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"a shard did not answer within {timeout_s:.3g} s") from None
        except Exception:
            # NOTE: the other calls' errors (shards refuse together) are read too, else Ray
            # reports each as an unhandled error when its reference goes
            done, _ = ray.wait(
                calls, num_returns=len(calls), timeout=max(end - time.monotonic(), 0)
            )
            for ref in done:
                with contextlib.suppress(Exception):
                    ray.get(ref, timeout=0)
            raise

    @staticmethod
    def refused(error: BaseException) -> bool:
        """Whether ``error`` is a shard's refusal, before doing any of the call."""
        return shard_refused(error)

    def keep_only(self, handles: list) -> None:
        """Nothing kept per shard: each call names its actor."""

    def close(self) -> None:
        """Nothing held open."""


def shard_down(error: BaseException) -> bool:
    """Whether a shard call failed because the shard is down or reloading."""
    if isinstance(error, ray.exceptions.RayActorError | ray.exceptions.ObjectLostError):
        return True
    return shard_refused(error)


def shard_refused(error: BaseException) -> bool:
    """Whether a shard refused a call before doing any of it (reloading, or its places hold
    other experts than the call means)."""
    return isinstance(error, ray.exceptions.RayTaskError) and isinstance(
        error.as_instanceof_cause(), ShardNotReadyError
    )


def blocking_shard_calls(spec: PoolSpec):
    """:func:`shard_calls`, from the caller's own thread (compute calls only)."""
    if spec.shards.transport == "grpc":
        wait = spec.faults.hedge_after_s  # NOTE: a shard restarting answers late: a miss
        return BlockingGrpcShards(spec, lambda h: ray.get(h.endpoint.remote(), timeout=wait))
    return BlockingRayShards()


def shard_calls(spec: PoolSpec, handles: list):
    """The transport ``spec.shards.transport`` names, to the shards ``handles``."""
    if spec.shards.transport == "grpc":
        return GrpcShardCalls(spec, handles, lambda h: h.endpoint.remote(), shard_down)
    return RayShardCalls(handles)
