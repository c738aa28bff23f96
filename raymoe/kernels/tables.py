"""Big expert tables on huge pages.

A PEER bank reads single rows of a table of a million experts or more (2 GB at d = 256, fp32)
at random. On 4 KB pages nearly every row read also misses the TLB: measured on the 2-core
machine, 1024 tokens x 128 slots of u and v rows took 39 ms on 4 KB pages and 26 ms on 2 MB
ones. Linux gives huge pages to memory that asks for them (``MADV_HUGEPAGE``) where
transparent huge pages are in ``madvise`` mode, the default of many distributions; elsewhere
the advice changes nothing.
"""

from __future__ import annotations

import math
import mmap

import torch

# NOTE: smaller tables stay with torch's allocator: a mapping per table costs a system call
# and rounds up to whole pages, and small tables' rows stay in the TLB's reach anyway
HUGE_MIN_BYTES = 64 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.zeros(shape)``; a big table on the CPU is mapped with huge-page advice (a
    fresh anonymous mapping reads as zeros, and gets its pages on first touch)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES or advise is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(advise)
    return torch.frombuffer(mem, dtype=dtype, count=math.prod(shape)).view(shape)
