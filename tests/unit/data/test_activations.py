"""A shard's kept activations: a backward that uses them equals one that recomputes; the
window is bounded by bytes; a forward whose bank changed since is recomputed."""

from __future__ import annotations

import numpy as np

from raymoe import PoolSpec
from raymoe._private.data.shard import ExpertShard
from tests.helpers import spec_dict


def _shard(window_mb: int = 64) -> ExpertShard:
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=4), "shards": {"activation_window_mb": window_mb}}
    )
    return ExpertShard(spec, 0, np.arange(4))


def _batch(seed: int, t: int = 6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 16), dtype=np.float32)
    ids = rng.integers(0, 4, (t, 2)).astype(np.int64)
    w = rng.random((t, 2), dtype=np.float32)
    return x, ids, w, rng.standard_normal((t, 16), dtype=np.float32)


def test_kept_backward_equals_recomputed():
    kept, plain = _shard(), _shard()
    x, ids, w, gy = _batch(0)
    y = kept.compute(x, ids, w, keep=7)
    assert np.allclose(y, plain.compute(x, ids, w), atol=1e-6)
    assert len(kept.kept) == 1 and kept.kept.bytes > 0
    got, want = kept.backward(x, ids, w, gy, keep=7), plain.backward(x, ids, w, gy)
    for a, b in zip(got, want, strict=True):
        assert np.allclose(a, b, atol=1e-6)
    for k, v in kept.expert_grads(np.arange(4)).items():
        assert np.allclose(v, plain.expert_grads(np.arange(4))[k], atol=1e-6), k
    assert (kept.kept.hits, kept.kept.misses, len(kept.kept)) == (1, 0, 0)


def test_window_drops_the_oldest_and_a_changed_bank_recomputes():
    shard = _shard()
    x, ids, w, gy = _batch(1)
    shard.compute(x, ids, w, keep=1)
    one = shard.kept.bytes
    shard.kept.max_bytes = int(one * 2.5)  # room for two
    for key in (2, 3):
        shard.compute(x, ids, w, keep=key)
    assert list(shard.kept._kept) == [2, 3] and shard.kept.bytes == 2 * one
    shard.backward(x, ids, w, gy, keep=1)  # evicted: recomputed
    shard.import_experts(np.array([0]), shard.export_experts(np.array([0])))  # rows written
    shard.backward(x, ids, w, gy, keep=2)  # the bank changed since its forward: recomputed
    other = _batch(2)
    shard.backward(other[0], other[1], other[2], other[3], keep=3)  # other pairs: recomputed
    assert (shard.kept.hits, shard.kept.misses) == (0, 3)


def test_a_backward_without_inputs_uses_the_kept_forward_or_asks_for_them():
    kept, plain = _shard(), _shard()
    x, ids, w, gy = _batch(4)
    kept.compute(x, ids, w, keep=9)
    got, want = kept.backward(None, ids, None, gy, keep=9), plain.backward(x, ids, w, gy)
    for a, b in zip(got, want, strict=True):
        assert np.allclose(a, b, atol=1e-6)
    before = kept.expert_grads(np.arange(4))
    assert kept.backward(None, ids, None, gy, keep=9) is None  # used up: send the inputs
    assert kept.backward(None, ids, None, gy) is None
    for k, v in kept.expert_grads(np.arange(4)).items():  # and nothing changed
        assert np.array_equal(v, before[k]), k
    assert (kept.kept.hits, kept.kept.misses) == (1, 1)


def test_no_window_keeps_nothing():
    shard = _shard(0)
    x, ids, w, _ = _batch(3)
    shard.compute(x, ids, w, keep=5)
    assert len(shard.kept) == 0
