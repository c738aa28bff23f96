"""The CLI is a thin shell: errors exit 2 with a message naming the problem."""

from __future__ import annotations

from raymoe.cli import main


def test_bad_config_exits_2_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "d_model: 8\nexperts: {kind: ffn, num_experts: 2, hidden: 4}\nrouting: {kind: topk, k: 3}\n"
    )
    assert main(["demo", "--configs", str(bad)]) == 2
    assert "routing.k" in capsys.readouterr().err


def test_reports_are_plain_json():
    import json

    import numpy as np

    from raymoe.reports import Latency, OpReport, PoolStats

    s = PoolStats(
        window_s=1.0,
        requests=1,
        tokens=2,
        tokens_per_s=2.0,
        latency=Latency(1, 2),
        batch_tokens_mean=2.0,
        batch_tokens_max=2,
        pairs_per_shard=(1, 0),
        imbalance=2.0,
        expert_load=np.arange(3),
        counters={"batches": 1},
    )
    assert json.loads(json.dumps(s.to_dict()))["latency"] == {"p50_ms": 1, "p99_ms": 2}
    r = OpReport(version=3, pinned={5: 2}, expert_ids=(8, 9))
    assert json.loads(json.dumps(r.to_dict()))["pinned"] == {"5": 2}


def test_resume_brings_a_pool_back_as_saved(capsys):
    """--resume takes no spec changes (it would not be the saved pool), and says so before
    anything starts."""
    assert main(["serve", "--resume", "p", "--shards", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
