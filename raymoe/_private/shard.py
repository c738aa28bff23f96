"""ExpertShard: the plain class behind a shard actor (``ray.remote`` is applied elsewhere).

A shard owns a set of expert replicas in one expert bank, addressed by local index. Tensors
cross its boundary as numpy arrays (zero-copy out of the Ray object store; DESIGN §5).
"""

from __future__ import annotations

import numpy as np
import torch

from raymoe.config import PoolSpec
from raymoe.errors import ShardNotReadyError
from raymoe.kernels import make_bank


class ExpertShard:
    """Shapes: t tokens, S slots, d width, L local experts.

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
        self.bank = None
        self.expert_ids = torch.zeros(0, dtype=torch.int64)
        if expert_ids is not None:
            self.configure(expert_ids, rows)

    def configure(self, expert_ids: np.ndarray, rows: dict[str, np.ndarray] | None = None):
        """Build the bank of ``expert_ids`` (seeded init), then load ``rows`` if given."""
        self.expert_ids = torch.as_tensor(np.asarray(expert_ids), dtype=torch.int64)  # [L]
        self.bank = make_bank(self.spec, self.expert_ids, device=self.device).eval()
        self.tokens_per_local = torch.zeros(len(self.expert_ids), dtype=torch.int64)
        if rows:
            self.import_experts(self.expert_ids.numpy(), rows)

    @property
    def ready(self) -> bool:
        return self.bank is not None

    def status(self) -> dict:
        return {"shard": self.shard_id, "ready": self.ready, "experts": len(self.expert_ids)}

    @torch.no_grad()
    def compute(self, x: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``x`` [t, d], ``local_ids`` [t, S] (-1 = not here), ``weights`` [t, S] -> [t, d]."""
        if self.bank is None:
            raise ShardNotReadyError(f"shard {self.shard_id} is loading its experts")
        xt = torch.from_numpy(x).to(self.device)
        ids = torch.from_numpy(local_ids).to(self.device)
        w = torch.from_numpy(weights).to(self.device)
        flat = ids[ids >= 0].cpu()
        self.tokens_per_local += torch.bincount(flat, minlength=len(self.expert_ids))
        return self.bank(xt, ids, w).cpu().numpy()

    def take_load(self) -> tuple[np.ndarray, np.ndarray]:
        """(global expert ids [L], tokens each got since the last call [L]); resets counts."""
        if self.bank is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        counts = self.tokens_per_local.numpy().copy()
        self.tokens_per_local.zero_()
        return self.expert_ids.numpy().copy(), counts

    def export_experts(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Weights of ``global_ids`` (which must live here) as ``{name: [n, ...]}``."""
        local = self._local(global_ids)
        return {k: v.cpu().numpy() for k, v in self.bank.export_rows(local).items()}

    def import_experts(self, global_ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Overwrite experts ``global_ids`` (which must live here) with ``rows``."""
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in rows.items()}
        self.bank.import_rows(self._local(global_ids), tensors)

    def _local(self, global_ids: np.ndarray) -> torch.Tensor:
        gid = torch.as_tensor(np.asarray(global_ids), dtype=torch.int64)
        order = torch.argsort(self.expert_ids)
        pos = torch.searchsorted(self.expert_ids[order], gid).clamp(max=len(order) - 1)
        local = order[pos]
        if not bool((self.expert_ids[local] == gid).all()):
            missing = gid[self.expert_ids[local] != gid][:5].tolist()
            raise KeyError(f"shard {self.shard_id} does not hold experts {missing}")
        return local
