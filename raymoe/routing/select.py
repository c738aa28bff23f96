"""Canonical top-k selection.

``torch.topk`` may return either of two tied entries, so the same scores can route to
different experts depending on the kernel. raymoe fixes one answer everywhere (in-process,
in every shard layout, in every test): the k largest scores, ties broken towards the lower
index, returned in order of score (descending), then index (ascending).
"""

from __future__ import annotations

import torch

from raymoe.kernels import native


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores``: [..., M] -> (values [..., k], indices [..., k]) in canonical order.

    ``values`` are gathered from ``scores`` so gradients flow to the selected entries.
    """
    lead, M = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, M)
    with torch.no_grad():
        if k >= M:
            idx = _canonical(flat, torch.arange(M, device=scores.device).expand(flat.shape[0], M))
        else:
            got = native.topk(flat, k)  # None off the CPU, or where it cannot build
            if got is not None and not scores.requires_grad:
                return got[0].view(*lead, k), got[1].view(*lead, k)
            idx = _torch_topk(flat, k) if got is None else got[1]
    return flat.gather(-1, idx).view(*lead, k), idx.view(*lead, k)


def _torch_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The canonical top-k indices [N, k] of ``flat`` [N, M], k < M, with torch's ops."""
    idx, vals, tied, thr = _topk_and_ties(flat, k)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        idx[rows] = _lowest_index_topk(flat[rows], thr[rows], k)
    # topk's order (score descending) is canonical but for equal scores inside the top-k:
    # only rows with a tie are sorted again
    tied = tied | (vals[:, 1:] == vals[:, :-1]).any(-1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        idx[rows] = _canonical(flat[rows], idx[rows])
    return idx


def _canonical(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` [N, k] ordered by score descending, then index ascending."""
    idx, _ = idx.sort(-1)
    order = flat.gather(-1, idx).sort(dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


# NOTE: torch's CPU topk is about 2x faster for k <= 16 than for k = 17 (measured on the 2-core
# machine): below that, one extra candidate is the cheapest tie test; above, counting the
# entries that reach the k-th value is (one compare, no copy of the scores).
_FAST_TOPK = 16


def _topk_and_ties(flat: torch.Tensor, k: int):
    """Top-k indices [N, k] and values [N, k] (descending), rows where a tie straddles the
    k-th place [N], k-th values [N, 1]."""
    if k + 1 <= _FAST_TOPK:
        vals, idx = torch.topk(flat, k + 1, dim=-1)
        thr = vals[:, k - 1 : k]
        return idx[:, :k].contiguous(), vals[:, :k], vals[:, k - 1] == vals[:, k], thr
    vals, idx = torch.topk(flat, k, dim=-1)
    thr = vals[:, k - 1 :]
    return idx, vals, (flat >= thr).sum(-1) > k, thr


def _lowest_index_topk(s: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """Rows ``s`` whose k-th value ``threshold`` is tied: all above it, then the lowest tied."""
    above, equal = s > threshold, s == threshold
    need = k - above.sum(-1, keepdim=True)
    take = above | (equal & (equal.cumsum(-1) <= need))
    return take.nonzero()[:, 1].view(-1, k)
