"""Deterministic, shard-independent parameter initialisation.

Rows of a stacked ``[E, ...]`` parameter are drawn in fixed blocks of experts (about 2^20
values a block, so the block size depends only on the row shape), each block from its own
generator seeded by (seed, name, block). A shard that owns experts ``[a, b)`` can thus
draw exactly the rows the in-process reference layer draws, without anyone materialising the
whole pool (a 1M-expert PEER pool is 2 GB).
"""

from __future__ import annotations

import hashlib
import math

import torch

BLOCK_VALUES = 1 << 20


def block_rows(shape: tuple[int, ...]) -> int:
    """Experts per init block for rows of ``shape``."""
    return max(1, BLOCK_VALUES // max(1, math.prod(shape)))


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_rows(
    name: str,
    rows: torch.Tensor,
    shape: tuple[int, ...],
    *,
    seed: int,
    scale: float,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform(-scale, scale) rows for global expert ids ``rows`` ([n]) -> ``[n, *shape]``."""
    n = rows.numel()
    out = torch.empty((n, *shape), dtype=torch.float32)
    if n:
        B = block_rows(shape)
        blocks = torch.div(rows, B, rounding_mode="floor")
        for b in torch.unique(blocks).tolist():
            sel = (blocks == b).nonzero().squeeze(1)
            g = torch.Generator().manual_seed(_block_seed(seed, name, b))
            full = torch.empty((B, *shape)).uniform_(-scale, scale, generator=g)
            out[sel] = full[rows[sel] - b * B]
    return out.to(dtype=dtype, device=device)


def init_tensor(
    name: str, shape: tuple[int, ...], *, seed: int, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """Uniform(-scale, scale) tensor for a parameter that is not stacked over experts."""
    g = torch.Generator().manual_seed(_block_seed(seed, name, -1))
    return torch.empty(shape).uniform_(-scale, scale, generator=g).to(dtype)
