"""Routing kinds (DESIGN §3): pure functions from hidden states to (expert ids, weights)."""

from raymoe.routing import capacity, hashing, hierarchical, product_key, soft, topk  # noqa: F401
from raymoe.routing.base import GATES, Gate, Routes, make_gate
from raymoe.routing.losses import LoadStats, load_balancing_loss, router_z_loss, tokens_per_expert
from raymoe.routing.select import select_topk

__all__ = [
    "GATES",
    "Gate",
    "LoadStats",
    "Routes",
    "load_balancing_loss",
    "make_gate",
    "router_z_loss",
    "select_topk",
    "tokens_per_expert",
]
