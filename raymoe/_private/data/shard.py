"""ExpertShard: the plain class behind a shard actor (``ray.remote`` is applied elsewhere).

A shard owns a set of expert replicas in one expert bank, addressed by local index. Tensors
cross its boundary as numpy arrays (zero-copy out of the Ray object store; DESIGN §5).
"""

from __future__ import annotations

import numpy as np
import torch

from raymoe import checkpoint
from raymoe._private.data.activations import ActivationWindow, forward_kept
from raymoe._private.data.dispatch import places_digest
from raymoe.config import PoolSpec
from raymoe.errors import PlacementMismatchError, ShardNotReadyError
from raymoe.kernels import make_bank, native, seeded_bank
from raymoe.optim import OptimizerSpec, RowGrads, RowState
from raymoe.optim.rows import STATE_PREFIX
from raymoe.optim.steps import accumulate, step_rows, touched


class ExpertShard:
    """Shapes: t tokens, S slots, d width, L local experts.

    In training a shard also holds, keyed by expert id (so that they survive its places
    moving): the gradients its backwards accumulated (``grads``) and the lazy optimizer
    state of the experts it stepped (``state``, exported and imported with their rows).

    A shard starts empty when built without ``expert_ids``: a shard actor that Ray restarts
    re-runs only this constructor, and stays not ready (``compute`` raises
    :class:`ShardNotReadyError`) until its controller calls :meth:`configure` again.
    """

    def __init__(
        self,
        spec: PoolSpec,
        shard_id: int,
        expert_ids: np.ndarray | None = None,
        device: str = "cpu",
        rows: dict[str, np.ndarray] | None = None,
    ):
        self.spec = spec
        self.shard_id = shard_id
        self.device = torch.device(device)
        self.bank = None  # the bank in service; None while (re)loading
        self._bank = None  # the bank being built or loaded
        self.expert_ids = torch.zeros(0, dtype=torch.int64)
        self.mismatches = 0  # sub-batches refused by the places check
        self.routing_version = 0  # sub-batches gated under older gates are refused (fence)
        self.grads = RowGrads()
        self.state = RowState()
        self.kept = ActivationWindow(spec.shards.activation_window_mb << 20)
        if expert_ids is not None:
            self.configure(expert_ids, rows)

    def configure(
        self,
        expert_ids: np.ndarray,
        rows: dict[str, np.ndarray] | None = None,
        ready: bool = True,
        spec: PoolSpec | None = None,
        files: list[str] | None = None,
    ) -> None:
        """Build the bank for ``expert_ids`` ([L], the global id at each local index, -1 = a
        free place) with the seeded init, then load ``rows`` (of the live ids, in local
        order) if given. With ``files`` the rows come from there (:meth:`load_files`), the
        seeded init only for experts in none of them. With ``ready=False`` the shard
        refuses work until :meth:`mark_ready` (while its controller imports the rest of its
        weights). ``spec``: the pool's current spec (experts added since it started)."""
        self.spec = spec or self.spec
        self.bank = None
        self.expert_ids = torch.as_tensor(np.asarray(expert_ids), dtype=torch.int64)  # [L]
        ids = self.expert_ids.clamp(min=0)
        if files:  # no seeded init to overwrite: the bank is built once, rows loaded into it
            self._bank = make_bank(self.spec, ids, device=self.device, seeded=False).eval()
            self.load_files(files)
        else:
            self._bank = seeded_bank(self.spec, ids, device=self.device).eval()
        if rows:
            live = self.expert_ids[self.expert_ids >= 0].numpy()
            self.import_experts(live, rows)
        if ready:
            self.mark_ready()

    def restore(self, global_ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Import a weight increment while (re)loading; ids that no longer live here skip."""
        self.import_experts(global_ids, rows, missing_ok=True)

    def mark_ready(self) -> None:
        self.bank = self._bank

    def fence(self, routing_version: int) -> None:
        """Refuse, from now on, sub-batches gated under routing versions older than
        ``routing_version`` (a caller's gates from before experts were added or removed, or
        the gate weights changed: the pool's function changed with them)."""
        self.routing_version = max(self.routing_version, int(routing_version))

    def load_files(self, files: list[str]) -> int:
        """Load the rows of the experts held here from ``files`` (safetensors of expert
        rows, memory-mapped: only these rows are read; a later file wins). -> rows read."""
        live = self.expert_ids[self.expert_ids >= 0].numpy()
        found = np.zeros(0, np.int64)
        step = checkpoint.rows_per_piece(self._bank.row_bytes())
        for file in files:
            with checkpoint.RowFile(file) as rf:
                at = np.flatnonzero(np.isin(rf.ids, live))
                for i in range(0, len(at), step):
                    part = at[i : i + step]
                    self.import_experts(rf.ids[part], rf.rows(part))
                found = np.union1d(found, rf.ids[at])
        rest = torch.as_tensor(np.setdiff1d(live, found))  # in no file: the seeded init
        for i in range(0, len(rest), step):
            gid = rest[i : i + step]
            self._bank.import_rows(self._local(gid.numpy()), self.rows_for(gid, None))
        return len(found)

    def write_rows(self, file: str, global_ids: np.ndarray) -> dict:
        """Write experts ``global_ids`` (held here) as a safetensors file of rows (``ids``
        and a tensor per bank name), a piece at a time. -> size and SHA-256. Refused while
        the shard (re)loads: its bank holds rows not loaded yet."""
        if not self.ready:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        ids = np.asarray(global_ids, np.int64)
        local = self._local(ids)
        first = self._export(local[:1], ids[:1])
        layout = {"ids": (ids.dtype, ids.shape)}
        layout.update({k: (v.dtype, (len(ids), *v.shape[1:])) for k, v in first.items()})
        step = checkpoint.rows_per_piece(self._bank.row_bytes())

        def pieces(name: str):
            if name == "ids":
                yield ids
                return
            for i in range(0, len(ids), step):
                yield self._export(local[i : i + step], ids[i : i + step])[name]

        return checkpoint.write_tensors(file, layout, pieces)

    def _export(self, local: torch.Tensor, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``local`` (experts ``ids``), with their optimizer state if any is
        held here."""
        rows = self._bank.export_rows(local)
        rows.update(self.state.export(torch.as_tensor(ids, dtype=torch.int64)))
        return {k: v.cpu().numpy() for k, v in rows.items()}

    def place(self, local: np.ndarray, global_ids: np.ndarray, rows=None, spec=None) -> None:
        """Put experts ``global_ids`` at local indices ``local`` ([n]; the bank grows when
        they lie beyond it), with ``rows`` (``{name: [n, ...]}``) or the seeded init.

        NOTE: make before break: the places that running batches read are never touched;
        a controller only places an expert where its current placement has no replica.
        ``spec``: the pool's spec with the experts placed (where they were just added).
        """
        self.spec = spec or self.spec
        local = torch.as_tensor(np.asarray(local), dtype=torch.int64)
        gid = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        if not len(local):
            return
        size = self.size_for(local)
        if size:
            self._adopt(*self._grown(size))
        tensors = self.rows_for(gid, rows)
        self._bank.import_rows(local, self._take_state(gid, tensors))
        self.expert_ids[local] = gid

    def reserve(self, places: int) -> None:
        """Grow the bank to at least ``places`` places now (before a copy of many experts,
        so that it grows once rather than with every chunk)."""
        if places > len(self.expert_ids):
            self._adopt(*self._grown(places))

    def size_for(self, local: torch.Tensor) -> int | None:
        """The size the bank must grow to before ``local`` fits (None: it fits)."""
        size, need = len(self.expert_ids), int(local.max()) + 1
        return max(need, size + size // 4) if need > size else None

    def rows_for(self, gid: torch.Tensor, rows) -> dict[str, torch.Tensor]:
        """``rows`` as tensors, or the seeded init of experts ``gid``."""
        if rows is None:
            bank = seeded_bank(self.spec, gid, device=self.device)
            return bank.export_rows(torch.arange(len(gid)))
        return {k: torch.as_tensor(np.asarray(v)) for k, v in rows.items()}

    def free(self, local: np.ndarray) -> None:
        """Forget the experts at ``local`` (their places may be reused by a later ``place``).
        Places past the bank are skipped: a shard that restarted meanwhile has not (or not
        yet) loaded them."""
        local = torch.as_tensor(np.asarray(local), dtype=torch.int64)
        local = local[local < len(self.expert_ids)]
        self.state.drop(self.expert_ids[local])  # NOTE: its gradients stay for the next step
        self.expert_ids[local] = -1

    def _grown(self, size: int):
        """A bank of ``size`` places holding the current rows; reads the bank, changes
        nothing (so sub-batches may run meanwhile). -> (bank, expert ids)."""
        ids = torch.full((size,), -1, dtype=torch.int64)
        ids[: len(self.expert_ids)] = self.expert_ids
        # NOTE: no seeded init here: kept rows are copied, new places are filled by place()
        bank = make_bank(self.spec, ids.clamp(min=0), device=self.device, seeded=False).eval()
        keep = torch.arange(len(self.expert_ids))
        bank.import_rows(keep, self._bank.export_rows(keep))
        return bank, ids

    def _adopt(self, bank, ids: torch.Tensor) -> None:
        """Put a grown bank in service (a swap: fast)."""
        self._bank, self.expert_ids = bank, ids
        if self.bank is not None:
            self.bank = bank

    @property
    def ready(self) -> bool:
        return self.bank is not None

    def status(self) -> dict:
        live = int((self.expert_ids >= 0).sum())
        return {
            "shard": self.shard_id,
            "ready": self.ready,
            "experts": live,
            "places": len(self.expert_ids),
            "mismatches": self.mismatches,
            "grad_rows": len(self.grads),
            "state_rows": len(self.state),
            "state_bytes": self.state.nbytes(),
        }

    @torch.no_grad()
    def compute(
        self,
        x: np.ndarray,
        local_ids: np.ndarray,
        weights: np.ndarray,
        digest: int | None = None,
        keep: int | None = None,
        routing: int | None = None,
    ) -> np.ndarray:
        """``x`` [t, d], ``local_ids`` [t, S] (-1 = not here), ``weights`` [t, S] -> [t, d].
        ``digest``: :func:`places_digest` of the experts the router means at those places;
        refused (:class:`PlacementMismatchError`) when the places hold others. ``keep``: a
        training forward's key; its activations stay (bounded) for :meth:`backward`.
        ``routing``: the routing version of the gates of a caller that gated the sub-batch
        itself; refused when older than the shard's :meth:`fence`."""
        if self.bank is None:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        if routing is not None and routing < self.routing_version:
            self.mismatches += 1
            raise PlacementMismatchError(
                f"shard {self.shard_id}: a sub-batch gated under routing version {routing}, "
                f"older than {self.routing_version}; not computed"
            )
        local = torch.from_numpy(local_ids)
        if digest is not None:
            self._check_places(local, digest)
        xt = torch.from_numpy(x).to(self.device)
        ids = local.to(self.device)
        w = torch.from_numpy(weights).to(self.device)
        if keep is None or not self.kept.max_bytes:
            return self.bank(xt, ids, w).cpu().numpy()
        kept = forward_kept(self.bank, xt, ids, w)
        self.kept.put(keep, kept)
        return kept.y.detach().cpu().numpy()

    def backward(
        self,
        x: np.ndarray | None,
        local_ids: np.ndarray,
        weights: np.ndarray | None,
        grad_y: np.ndarray,
        digest: int | None = None,
        keep: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The backward of :meth:`compute` for ``grad_y`` ([t, d], the gradient of its
        output): -> (grad of ``x`` [t, d], grad of ``weights`` [t, S]). The experts'
        gradients add up in ``self.grads`` until a step or :meth:`zero_grad`. It uses the
        activations the forward ``keep`` kept, or recomputes the forward from ``x`` and
        ``weights``; without them (None: the caller counts on the kept forward) and with no
        kept forward, it does nothing and answers None: the caller sends them."""
        if self.bank is None:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        local = torch.from_numpy(local_ids)
        if digest is not None:
            self._check_places(local, digest)
        ids = local.to(self.device)
        kept = self.kept.take(keep, ids, self.bank)
        if kept is None:
            if x is None or weights is None:
                return None
            xt = torch.from_numpy(np.array(x)).to(self.device)
            w = torch.from_numpy(np.array(weights)).to(self.device)
            kept = forward_kept(self.bank, xt, ids, w, measure=False)
        xt, w, y = kept.x, kept.weights, kept.y
        with torch.enable_grad():
            y.backward(torch.from_numpy(grad_y).to(self.device, y.dtype))
        reached = touched(ids)
        accumulate(self.grads, self.bank, reached, self.expert_ids[reached.cpu()])
        return xt.grad.cpu().numpy(), w.grad.cpu().numpy()

    # --- gradients and optimizer steps (keyed by expert id: see the class docstring) -----

    def expert_grads(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The gradients accumulated here for experts ``global_ids`` as ``{name: [n, ...]}``
        (zeros for an expert no backward here reached)."""
        ids = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        return _numpy(self.grads.get(ids, self._row_shapes()))

    def grad_ids(self) -> np.ndarray:
        """The experts with gradients accumulated here, sorted."""
        return self.grads.ids.numpy()

    def take_grads(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`expert_grads`, and forget them here (they move to the experts' owner)."""
        ids = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        return _numpy(self.grads.take(ids, self._row_shapes()))

    def add_grads(self, global_ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Add gradients of experts ``global_ids`` that other shards accumulated."""
        ids = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        self.grads.add(ids, {k: torch.as_tensor(np.asarray(v)) for k, v in rows.items()})

    def grad_square_sum(self) -> float:
        return self.grads.square_sum()

    def step(self, optimizer: dict, scale: float = 1.0) -> np.ndarray:
        """One optimizer step (``optimizer``: an :class:`OptimizerSpec` as a dict) of the
        experts held here that have gradients, scaled by ``scale``; their gradients are
        used up. Gradients of experts not held here stay. -> the experts stepped."""
        if self.bank is None:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        spec = OptimizerSpec.of(optimizer)
        ids = self.grads.ids[torch.isin(self.grads.ids, self.expert_ids)]
        grads = self.grads.take(ids)
        step_rows(spec, self.bank, self._local(ids.numpy()), ids, grads, self.state, scale)
        return ids.numpy()

    def refresh(self, global_ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Overwrite replicas of experts ``global_ids`` with their owner's rows and
        optimizer state, after it stepped them."""
        self.import_experts(global_ids, rows)

    def zero_grad(self) -> None:
        """Drop the accumulated expert gradients."""
        self.grads.drop()
        if self.bank is not None:
            self.bank.zero_grad(set_to_none=True)

    def _row_shapes(self) -> dict[str, torch.Tensor]:
        bank = self.bank if self.bank is not None else self._bank
        return {k: p[:0].detach() for k, p in bank.named_parameters()}

    def _take_state(self, ids: torch.Tensor, rows: dict) -> dict:
        """``rows`` without their optimizer state, which goes into ``self.state``."""
        state = {k: v for k, v in rows.items() if k.startswith(STATE_PREFIX)}
        if state:
            self.state.load(torch.as_tensor(ids, dtype=torch.int64), state)
        return {k: v for k, v in rows.items() if not k.startswith(STATE_PREFIX)}

    def _check_places(self, local: torch.Tensor, digest: int) -> None:
        if _held_digest(local, self.expert_ids) == digest:
            return
        self.mismatches += 1
        raise PlacementMismatchError(
            f"shard {self.shard_id}: a sub-batch named experts its places do not hold "
            f"(its layout and the router's placement disagree); not computed"
        )

    def export_experts(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Weights of ``global_ids`` (which must live here) as ``{name: [n, ...]}``."""
        if not self.ready:  # restarted: its rows are not (all) loaded yet
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        return self._export(self._local(global_ids), np.asarray(global_ids))

    def import_experts(
        self, global_ids: np.ndarray, rows: dict[str, np.ndarray], missing_ok: bool = False
    ) -> None:
        """Overwrite experts ``global_ids`` with ``rows``; ids that do not live here are an
        error, or skipped with ``missing_ok``."""
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in rows.items()}
        if missing_ok:
            here = torch.isin(torch.as_tensor(np.asarray(global_ids)), self.expert_ids)
            if not bool(here.any()):
                return
            global_ids = np.asarray(global_ids)[here.numpy()]
            tensors = {k: v[here] for k, v in tensors.items()}
        local = self._local(global_ids)
        self._bank.import_rows(local, self._take_state(self.expert_ids[local], tensors))

    def _local(self, global_ids: np.ndarray) -> torch.Tensor:
        gid = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        order = torch.argsort(self.expert_ids)
        pos = torch.searchsorted(self.expert_ids[order], gid).clamp(max=len(order) - 1)
        local = order[pos]
        if not bool((self.expert_ids[local] == gid).all()):
            missing = gid[self.expert_ids[local] != gid][:5].tolist()
            raise KeyError(f"shard {self.shard_id} does not hold experts {missing}")
        return local


def _held_digest(local: torch.Tensor, expert_ids: torch.Tensor) -> int | None:
    """The :func:`places_digest` of places ``local`` over the experts held there; None when a
    place is beyond the shard's."""
    try:
        done = native.places_digest(local, expert_ids)
    except IndexError:
        return None
    if done is not None:
        return done
    if bool((local >= len(expert_ids)).any()):
        return None
    return places_digest(local, expert_ids[local.clamp(min=0)])


def _numpy(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in rows.items()}
