"""The ``PoolHandle``: a client of one served pool (``raymoe.launch`` starts and finds pools)."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import ray
import torch

from raymoe._private import actors, timeouts
from raymoe._private.data import training
from raymoe._private.data.attempts import Picker
from raymoe._private.direct import DirectView
from raymoe.errors import (
    InvalidInputError,
    PoolUnavailableError,
)
from raymoe.optim import OptimizerSpec
from raymoe.reports import ForwardInfo, OpReport, PoolDescription, PoolStats


class PoolHandle:
    """A client of one pool; safe to pass to other Ray tasks and actors."""

    def __init__(self, name: str, controller, routers: list, direct: bool = True):
        self.name = name
        self.direct = direct  # small requests straight to the shards (limits.direct_max_tokens)
        self._controller = controller
        self._routers = routers
        self._picker = Picker()  # which router next; silent ones are hedged
        self._no_retry: dict = {}  # router -> its forward method that Ray does not retry
        self._direct: DirectView | None = None  # the view of the shards: training, small requests

    def __getstate__(self) -> dict:  # sent to tasks and actors: handles, not their methods
        return {**self.__dict__, "_no_retry": {}, "_picker": Picker(), "_direct": None}

    def forward_async(
        self, x, *, layer=0, expert_ids=None, weights=None, token_ids=None, timeout_s=None
    ):
        """Start a forward pass; returns a Ray ObjectRef of the numpy result (Ray resends it
        to the same router if that one restarts)."""
        i = self._pick()
        return self._send(i, x, layer, expert_ids, weights, token_ids, timeout_s, resend=False)

    def _pick(self, avoid: int | None = None) -> int:
        if not self._routers:  # connected while the pool was starting
            self._routers = _get(self._controller.routers.remote())
            if not self._routers:
                raise PoolUnavailableError(f"pool {self.name!r} is starting: no routers yet")
        return self._picker.pick(len(self._routers), avoid)

    def _send(self, i, x, layer, expert_ids, weights, token_ids, timeout_s, resend, info=False):
        """A forward call to router ``i``; with ``resend`` the caller resends a call whose
        router died (Ray does not wait for that router to restart)."""
        router = self._routers[i]
        method = router.forward
        if resend:  # NOTE: options() costs ~0.5 ms a call: made once per router
            method = self._no_retry.get(router) or self._no_retry.setdefault(
                router, router.forward.options(max_task_retries=0)
            )
        return method.remote(
            as_numpy(x),
            expert_ids=as_numpy(expert_ids),
            weights=as_numpy(weights),
            token_ids=as_numpy(token_ids),
            timeout_s=timeout_s,
            layer=layer,
            **({"info": True} if info else {}),
        )

    def forward(
        self,
        x,
        *,
        layer=0,
        expert_ids=None,
        weights=None,
        token_ids=None,
        timeout_s=None,
        return_info=False,
    ):
        """``x`` [..., d] (torch or numpy) through MoE layer ``layer`` -> output of the same
        kind and shape.

        ``expert_ids`` and ``weights`` ([T, S]) are client routes (the layer's expert ids;
        -1 = empty slot); ``token_ids`` ([T]) feed hash routing; ``timeout_s`` bounds the
        wait (at most the spec's ``limits.request_timeout_s``). With ``return_info``:
        (output, :class:`~raymoe.reports.ForwardInfo`). Raises typed raymoe errors
        (:class:`~raymoe.errors.LayerIndexError` for a layer the pool does not have).

        A small request (at most ``limits.direct_max_tokens`` tokens) goes from this thread
        straight to the shards, under the placement a router published last; one that
        cannot (another runs, a shard refused or failed it) goes through a router. A router
        that dies gets the call resent to the next one at once; one that stays silent (its
        node died) gets it hedged to another (forward is idempotent).
        """
        y = (
            self._view().serve(x, expert_ids, weights, token_ids, layer, timeout_s)
            if self.direct
            else None
        )
        if y is not None:
            out = torch.from_numpy(y) if isinstance(x, torch.Tensor) else y
            return (out, ForwardInfo(0, direct=True)) if return_info else out
        args = (x, layer, expert_ids, weights, token_ids, timeout_s)
        got = self._forward(args, int(np.prod(np.shape(x)[:-1])), return_info)
        y, info = got if return_info else (got, None)
        out = np.array(y)  # read-only out of the object store: copy
        out = torch.from_numpy(out) if isinstance(x, torch.Tensor) else out
        return (out, ForwardInfo(info["degraded_tokens"])) if return_info else out

    def _forward(self, args: tuple, tokens: int, info: bool):
        deadline = time.monotonic() + (args[-1] or timeouts.RESEND_S)
        calls: dict = {}  # ref -> (router index, sent at)
        hedged = False
        for attempt in itertools.count():
            if not calls:
                i = self._pick()
                calls[self._send(i, *args, resend=True, info=info)] = (i, time.monotonic())
            wait_s = None
            if not hedged and len(self._routers) > 1:
                sent = min(t for _, t in calls.values())
                wait_s = max(sent + self._picker.budget(tokens) - time.monotonic(), 0.0)
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=wait_s)
            if not ready:  # silent: hedged once, to another router
                (i, _), hedged = next(iter(calls.values())), True
                self._picker.suspect(i)
                j = self._pick(avoid=i)
                calls[self._send(j, *args, resend=True, info=info)] = (j, time.monotonic())
                continue
            i, sent = calls.pop(ready[0])
            try:
                got = _get(ready[0])
            except ray.exceptions.RayActorError as e:  # that router died or restarts
                self._picker.suspect(i)
                if calls:
                    continue  # the hedge may still answer
                if time.monotonic() >= deadline:
                    raise PoolUnavailableError(f"no router of {self.name!r} answered") from e
                if (attempt + 1) % len(self._routers):
                    continue  # forward is idempotent: the next router takes it now
                time.sleep(min(timeouts.BACKOFF_S[0] * 2**attempt, timeouts.BACKOFF_S[1]))
                self._routers = _get(self._controller.routers.remote())  # every one failed
                self._picker = Picker()
                continue
            self._picker.answered(i, time.monotonic() - sent, tokens)
            return got
        raise AssertionError("unreachable")

    # --- training (see raymoe.RemoteMoE) ---------------------------------------------------

    def train_forward(self, x, expert_ids, weights, *, layer=0, keep=None, timeout_s=None):
        """``forward(x, expert_ids=..., weights=..., layer=layer)`` for training: sent from
        here straight to the shards (not batched with other requests), and with ``keep`` (an
        int key) every shard keeps its activations for the :meth:`backward` of the same key
        (up to ``shards.activation_window_mb``; past it a backward recomputes)."""
        args = (as_numpy(x), as_numpy(expert_ids), as_numpy(weights), layer, keep)
        y = self._view().run(training.forward, *args, timeout_s=timeout_s)
        return y if isinstance(x, torch.Tensor) else y.numpy()

    def backward(self, x, expert_ids, weights, grad_y, *, layer=0, keep=None, timeout_s=None):
        """The backward of ``forward(x, expert_ids=..., weights=..., layer=layer)`` for the
        gradient ``grad_y`` of its output -> (grad of ``x``, grad of ``weights`` [T, S]), of
        the kind of ``x``. The experts' gradients add up on the shards
        (:meth:`expert_grads`, :meth:`zero_grad`). ``keep``: the key of a
        :meth:`train_forward` of the same ``x`` and routes, whose activations the shards use
        instead of recomputing. A shard that refuses its part (its places changed) gets it
        again under the new placement; any other failure raises, and the step is to be
        redone after :meth:`zero_grad`."""
        args = (as_numpy(x), as_numpy(expert_ids), as_numpy(weights), as_numpy(grad_y), layer, keep)
        gx, gw = self._view().run(training.backward, *args, timeout_s=timeout_s)
        return (gx, gw) if isinstance(x, torch.Tensor) else (gx.numpy(), gw.numpy())

    def expert_grads(self, expert_ids, *, layer=0) -> dict[str, torch.Tensor]:
        """The gradients accumulated for layer ``layer``'s experts ``expert_ids``, summed over
        their replicas, by bank name (``w_gate``, ``u``, ...): ``{name: [n, ...]}``."""
        got = self._view().run(training.expert_grads, as_numpy(expert_ids), layer)
        return {k: torch.from_numpy(np.array(v)) for k, v in got.items()}

    def zero_grad(self) -> None:
        """Drop every expert's accumulated gradient."""
        self._view().run(training.zero_grad)

    def expert_weights(self, expert_ids, *, layer=0, replica=0) -> dict[str, torch.Tensor]:
        """The weights of ``layer``'s experts ``expert_ids`` by bank name (``w_gate``, ``u``,
        ...): ``{name: [n, ...]}``, as replica ``replica`` of each holds them."""
        got = self._view().run(training.expert_weights, as_numpy(expert_ids), layer, int(replica))
        return {k: torch.from_numpy(np.array(v)) for k, v in got.items()}

    def _view(self) -> DirectView:
        """This handle's view of the shards, for training calls (made on first use)."""
        if self._direct is None:
            self._direct = DirectView(self._publication)
        return self._direct

    async def _publication(self, gates_of: int | None, traffic: dict | None) -> dict | None:
        """One router's publication for this handle's view (:meth:`Router.published`); a
        router that is down is suspect, and the next call asks another."""
        i = self._pick()
        try:
            return await self._routers[i].published.remote(gates_of, traffic)
        except ray.exceptions.RayActorError:
            self._picker.suspect(i)
            raise

    def grad_square_sum(self) -> float:
        """The sum of squares of the experts' accumulated gradients (for clipping by a
        global norm: :meth:`raymoe.optim.PoolOptimizer.clip_grad_norm_`)."""
        return _get(self._controller.grad_square_sum.options(max_task_retries=0).remote())

    def step(self, optimizer: OptimizerSpec | dict | str = "adam", *, scale: float = 1.0) -> dict:
        """One optimizer step (``sgd``, ``adam``, ``adamw``: an
        :class:`~raymoe.optim.OptimizerSpec`) of every expert with gradients, their
        gradients times ``scale``; they are used up. Each expert keeps its own lazy state on
        the shards, which moves with it. Runs under one placement version; replicas are
        equal again when it returns. Not retried: a failure raises, and the step is to be
        redone after :meth:`zero_grad`. -> {"experts": stepped, "replicas_refreshed": n}.
        :class:`raymoe.optim.PoolOptimizer` wraps it like a ``torch.optim`` optimizer."""
        spec = OptimizerSpec.of(optimizer)
        if not (math.isfinite(scale) and 0 < scale <= 1):
            raise InvalidInputError(f"scale must be in (0, 1]; got {scale}")
        method = self._controller.step.options(max_task_retries=0)
        return _get(method.remote(spec.to_dict(), float(scale)))

    def gate_weights(self) -> dict[str, np.ndarray]:
        """The gate and shared-expert weights in service, by pool names."""
        got = _get(self._routers[self._pick()].gate_weights.remote())
        if got is None:
            raise PoolUnavailableError(f"pool {self.name!r}: the router is not configured yet")
        return got

    def describe(self) -> PoolDescription:
        """Spec, shards, routers, placement and routing versions, experts per shard, pins."""
        return _get(self._controller.describe.remote())

    def stats(self, window_s: float = 60.0, load_bins: int = 0) -> PoolStats:
        """Traffic over the last ``window_s`` seconds, ending now: tokens/s, latency p50/p99,
        batch sizes, (token, expert) pairs per shard and their imbalance (max/mean over the
        shards holding experts), pairs per expert (numpy); with ``load_bins``, the load map
        (shard x bins of experts, :class:`~raymoe.reports.PoolStats`). This handle's own
        direct requests are handed to a router first, so they count."""
        self._flush()
        return _get(self._controller.stats.remote(window_s, load_bins))

    def _flush(self) -> None:
        if self._direct is not None:
            self._direct.flush()

    # --- runtime operations: idempotent; each returns an OpReport (placement version,
    # replicas added and dropped, bytes moved, imbalance before and after). Traffic keeps
    # flowing.

    def rebalance(self, dry_run: bool = False, policy: str | None = None) -> OpReport:
        """Plan a placement for the measured load (the spec's ``control.policy``, default
        ``balanced``) and apply it; ``dry_run`` only reports the plan. This handle's own
        direct requests count in the load."""
        self._flush()
        return self._op("rebalance", dry_run, policy)

    # Operations on experts take the ``layer`` they belong to (multi-layer pools).

    def replicate(self, expert_id: int, replicas: int, *, layer: int = 0) -> OpReport:
        """Give ``expert_id`` exactly ``replicas`` replicas, on distinct shards."""
        return self._op("replicate", int(expert_id), int(replicas), layer=layer)

    def pin(self, expert_id: int, replicas: int, *, layer: int = 0) -> OpReport:
        """Like :meth:`replicate`, and every later rebalance keeps that count."""
        return self._op("pin", int(expert_id), int(replicas), layer=layer)

    def unpin(self, expert_id: int, *, layer: int = 0) -> OpReport:
        return self._op("unpin", int(expert_id), layer=layer)

    def drain_shard(self, shard: int) -> OpReport:
        """Move every replica off ``shard`` (it stays up, holding nothing)."""
        return self._op("drain_shard", int(shard))

    def scale_shards(self, count: int) -> OpReport:
        """Grow or shrink the pool to ``count`` shards, redistributing experts."""
        return self._op("scale_shards", int(count))

    def add_experts(self, count: int, weights: dict | None = None, *, layer: int = 0) -> OpReport:
        """Add ``count`` experts to ``layer``; the report's ``expert_ids`` are their (new,
        stable) ids in the layer.

        ``weights`` in neutral names, stacked over the new experts: ``experts.*`` rows, and
        the gate rows (``router.weight`` etc. for ``topk``; ``router.keys`` of the new
        sub-key rows, [heads, rows, d_key/2], for ``product_key``, which grows by whole rows).
        Missing ones take the seeded init of the new ids."""
        w = {k: as_numpy(v) for k, v in (weights or {}).items()}
        return self._op("add_experts", count, w, layer=layer)

    def remove_experts(self, expert_ids, *, layer: int = 0) -> OpReport:
        """Stop routing to ``layer``'s ``expert_ids`` from the next placement version; free
        them once drained. Their ids are never reused."""
        return self._op("remove_experts", np.asarray(as_numpy(expert_ids)), layer=layer)

    def _op(self, name: str, *args, **kwargs) -> OpReport:
        return _get(self._controller.op.remote(name, *args, **kwargs))

    def save(self, path: str | Path) -> dict:
        """Write a checkpoint of the pool to ``path`` (safetensors per shard and a manifest,
        :mod:`raymoe.checkpoint`), consistent under one placement version while traffic
        flows; an existing checkpoint there is replaced atomically. The controller writes
        it: on a multi-node cluster, ``path`` must be storage its node sees. -> the
        manifest."""
        return _get(self._controller.save_checkpoint.remote(str(Path(path).resolve())))

    def audit(self, n: int = 20) -> list[dict]:
        """The last ``n`` admin changes of the pool (oldest first): time, operation,
        arguments (arrays by shape), and the placement version it published or its error."""
        return _get(self._controller.audit_log.remote(n))

    def gateways(self) -> list[str]:
        """The "host:port" of each of the pool's gRPC gateways (none unless
        ``gateway.enabled``)."""
        return _get(self._controller.gateways.remote())

    def shutdown(self) -> None:
        """Stop every actor of the pool and forget its saved state."""
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        _get(self._controller.shutdown.remote())
        actors.kill([self._controller])
        actors.kill(actors.gateways(self.name))  # any the controller did not know of


_get = actors.wait


def as_numpy(a):
    """``a`` as a numpy array (tensors detached and moved to the CPU); None and others as is."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().contiguous().numpy()
    return a
