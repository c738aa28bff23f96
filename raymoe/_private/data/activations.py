"""A shard's window of kept activations: the autograd graphs of training forwards, kept for
their backward so that it need not recompute the forward.

Bounded by bytes (the tensors autograd saved, weights not counted): the oldest go first. A
backward whose forward is gone, or whose bank changed since (it grew, or rows were written
into it), recomputes instead: the result is the same, only slower.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from raymoe.kernels.bank import ExpertBank


@dataclass
class Kept:
    x: torch.Tensor  # [t, d] leaf
    weights: torch.Tensor  # [t, S] leaf
    y: torch.Tensor  # [t, d], its graph
    local_ids: torch.Tensor  # [t, S]
    bank: ExpertBank
    versions: tuple[int, ...]  # the bank's parameters' versions at the forward
    nbytes: int


def _versions(bank: ExpertBank) -> tuple[int, ...]:
    return tuple(p._version for p in bank.parameters())


def forward_kept(
    bank: ExpertBank, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, measure: bool = True
) -> Kept:
    """``bank(x, ids, w)`` with autograd, its graph kept; with ``measure``, the bytes autograd
    saved are counted (for the window; a graph used at once need not be)."""
    weights = {p.untyped_storage().data_ptr() for p in bank.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.enable_grad(), hooks if measure else contextlib.nullcontext():
        y = bank(x, ids, w)
    return Kept(x, w, y, ids, bank, _versions(bank), sum(saved.values()))


class ActivationWindow:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[int, Kept] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def put(self, key: int, kept: Kept) -> None:
        self._pop(key)
        if kept.nbytes > self.max_bytes:
            return
        while self._kept and self.bytes + kept.nbytes > self.max_bytes:
            self._pop(next(iter(self._kept)))
        self._kept[key] = kept
        self.bytes += kept.nbytes

    def take(self, key: int | None, local_ids: torch.Tensor, bank: ExpertBank) -> Kept | None:
        """The forward kept under ``key``, if it computed these ``local_ids`` with ``bank``
        as it is now; gone from the window either way. (No key: nothing, and no miss.)"""
        if key is None:
            return None
        kept = self._pop(key)
        ok = (
            kept is not None
            and kept.bank is bank
            and kept.versions == _versions(bank)
            and torch.equal(kept.local_ids, local_ids)
        )
        if ok:
            self.hits += 1
            return kept
        self.misses += 1
        return None

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0

    def _pop(self, key: int) -> Kept | None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self.bytes -= kept.nbytes
        return kept

    def __len__(self) -> int:
        return len(self._kept)
