"""Checkpoint files without Ray: written atomically, read back bit-identical (multi-layer
pools with added and removed experts included), and every way a checkpoint can be broken
refused with a CheckpointError before anything is returned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raymoe import CheckpointError, MoEStack, PoolSpec
from raymoe import checkpoint as ck
from raymoe._private.data.gates import split_weights
from tests.helpers import spec_dict


def _pool_spec() -> PoolSpec:
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=6), "layers": 2, "shards": {"count": 2}}
    )
    return spec.with_experts_added(2, layer=0).with_experts_removed([1, 13])


def _write(path, spec, drop=()) -> dict:
    """A checkpoint of MoEStack(spec)'s weights, rows dealt to 2 shards."""
    rows, gate = split_weights(spec, MoEStack(spec).state_dict())
    live = [e for e in range(spec.num_experts) if e not in spec.removed_ids and e not in drop]
    shards = []
    for n in range(2):
        ids = np.asarray(live[n::2], np.int64)
        shards.append({"ids": ids, **{k: np.asarray(v)[ids] for k, v in rows.items()}})
    gate = {k: np.asarray(v) for k, v in gate.items()}
    return ck.write(path, spec, 7, shards, gate)


def test_a_checkpoint_reads_back_bit_identical(tmp_path):
    spec = _pool_spec()
    manifest = _write(tmp_path / "ck", spec)
    assert manifest["placement_version"] == 7 and len(manifest["files"]) == 3
    got_spec, weights, _ = ck.read(tmp_path / "ck")
    assert got_spec == spec and got_spec.removed_ids == (1, 13)
    want = MoEStack(spec).state_dict()
    for k, v in want.items():
        w = torch.as_tensor(weights[k])
        if ".experts." in k:  # removed experts have no rows: zeros
            layer = int(k.split(".")[1])
            live = [i for i, e in enumerate(spec.flat.ids(layer)) if e not in spec.removed_ids]
            assert torch.equal(w[live], v[live]), k
        else:
            assert torch.equal(w, v), k
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind


def test_a_new_checkpoint_replaces_the_old_one_and_nothing_else(tmp_path):
    spec = _pool_spec()
    _write(tmp_path / "ck", spec)
    _write(tmp_path / "ck", spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a raymoe checkpoint"):
        _write(tmp_path / "other", spec)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_broken_checkpoints_are_refused(tmp_path):
    spec = _pool_spec()
    path = tmp_path / "ck"
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        ck.read(path)
    _write(path, spec)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors is truncated or corr"):
        ck.read(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one bit of a weight
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted"):
        ck.read(path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors is missing"):
        ck.read(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.read(path)
    (path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(CheckpointError, match="unknown format"):
        ck.read(path)


def test_rows_that_miss_an_expert_are_refused(tmp_path):
    _write(tmp_path / "ck", _pool_spec(), drop=(4,))
    with pytest.raises(CheckpointError, match="do not cover"):
        ck.read(tmp_path / "ck")
