"""The placement table: construction, realize (kept places, new ones after), diff, bytes,
growth, and one maker of versions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from raymoe.placement import Placement, contiguous, diff, initial, place_new, realize, with_replicas

ROOT = Path(__file__).parents[3]


def test_contiguous_and_row_aligned():
    p = contiguous(10, 3)
    assert p.shard.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert p.local.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert p.shard_experts(1).tolist() == [4, 5, 6]
    q = contiguous(64, 3, align=8)  # whole sub-key rows of 8 per shard
    assert all(len(q.shard_experts(n)) % 8 == 0 for n in range(3))
    big = contiguous(1 << 20, 64, align=1024)
    assert big.held().tolist() == [16 * 1024] * 64


def test_replicas_are_appended_at_free_places():
    p = with_replicas(contiguous(6, 2), {1: [1], 4: [0]})
    assert p.replicas().tolist() == [1, 2, 1, 1, 2, 1] and p.version == 1
    assert p.shard_experts(1).tolist() == [3, 4, 5, 1]
    assert p.shard_experts(0).tolist() == [0, 1, 2, 4]


def test_initial_spreads_pins_and_leaves_removed_experts_out():
    p = initial(8, 4, replicas={2: 3}, removed=[5])
    assert p.replicas().tolist() == [1, 1, 3, 1, 1, 0, 1, 1]
    e, s = p.pairs()
    assert sorted(s[e == 2].tolist()) == [1, 2, 3]  # its own shard and the next ones


def test_realize_keeps_places_and_appends_new_replicas_after_used_ones():
    current = contiguous(8, 2)
    e = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0])
    s = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = realize(current, e, s)
    assert p.version == 2 and p.local[p.ptr[0] : p.ptr[1]].tolist() == [0, 4]
    change = diff(current, p)
    assert (change.replicas_added, change.replicas_dropped) == (1, 0)
    assert change.added[0].tolist() == [0] and change.added[2].tolist() == [4]


def test_placement_bytes_roundtrip_without_pickle():
    p = with_replicas(contiguous(10, 3), {1: [1, 2]}).bump()
    q = Placement.from_bytes(p.to_bytes())
    assert q.version == 2 and q.num_shards == 3 and q.same_layout(p)
    assert b"pickle" not in p.to_bytes()


def test_place_new_keeps_rows_whole_on_the_emptiest_active_shard():
    p = contiguous(16, 2, align=4)
    active = np.array([True, False])
    q = place_new(p, 8, 4, active)
    assert q.num_experts == 24 and q.version == 2
    assert set(q.primary()[0][16:].tolist()) == {0}


def test_one_place_makes_a_new_version():
    """Every placement version is made by Placement.bump (nowhere else adds 1 to one)."""
    hits = []
    for path in (ROOT / "raymoe").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines()):
            if re.search(r"version\s*\+\s*1", line):
                hits.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert hits == ["raymoe/placement/table.py:" + str(_bump_line())], hits


def _bump_line() -> int:
    lines = (ROOT / "raymoe/placement/table.py").read_text().splitlines()
    return next(i + 1 for i, ln in enumerate(lines) if "version=self.version + 1" in ln)
