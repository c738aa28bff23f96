"""Small spec builders shared by the tests."""

from __future__ import annotations

import copy
import socket
import threading

import torch

from raymoe import MoELayer, PoolSpec


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_dict(
    routing: dict,
    *,
    E: int = 8,
    d: int = 16,
    H: int = 24,
    kind: str = "ffn",
    shared: dict | None = None,
    **experts,
) -> dict:
    ex = {"kind": kind, "num_experts": E}
    if kind == "ffn":
        ex["hidden"] = H
    ex.update(experts)
    out = {"d_model": d, "experts": ex, "routing": copy.deepcopy(routing)}
    if shared:
        out["shared"] = shared
    return out


def make_layer(routing: dict, seed: int = 0, **kw) -> MoELayer:
    spec = PoolSpec.from_dict({**spec_dict(routing, **kw), "seed": seed})
    layer = MoELayer(spec)
    with torch.no_grad():  # make optional buffers non-trivial
        cb = getattr(layer.router, "correction_bias", None)
        if cb is not None:
            cb.copy_(torch.randn(cb.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return layer


def state(layer: MoELayer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


# one small pool per routing kind, shared by the sharded and the served parity tests
ROUTINGS = {
    "topk": spec_dict({"kind": "topk", "k": 3, "renormalize": True}, E=16),
    "groups": spec_dict(
        {
            "kind": "topk",
            "k": 2,
            "score": "sigmoid",
            "n_groups": 4,
            "topk_groups": 2,
            "correction_bias": True,
        },
        E=16,
        shared={"hidden": 8, "gate": True},
    ),
    "dense": spec_dict({"kind": "dense"}, E=16),
    "switch": spec_dict({"kind": "switch", "capacity_factor": 0.5}, E=16),
    "expert_choice": spec_dict({"kind": "expert_choice", "k": 2}, E=16),
    "hash": spec_dict({"kind": "hash", "vocab_size": 100}, E=16),
    "product_key": spec_dict(
        {"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=64, kind="peer"
    ),
    "hierarchical": spec_dict({"kind": "hierarchical", "n_groups": 4, "k_groups": 2, "k": 2}, E=16),
}


class ClientThreads:
    """``clients`` threads running ``self._run(i)`` until :attr:`stop` is set; a context
    manager that starts them and always stops and joins them."""

    def __init__(self, clients: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """``module`` with every parameter drawn anew (unlike its seeded init), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module
