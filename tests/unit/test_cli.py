"""The CLI is a thin shell: the demo runs end to end; errors exit 2 with a message."""

from __future__ import annotations

from raymoe.cli import main


def test_demo_runs_and_prints_a_table(capsys):
    assert main(["demo", "--configs", "mixtral-tiny", "--tokens", "64", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-tiny" in out and "shard imbalance" in out


def test_bad_config_exits_2_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 8\nexperts: {kind: ffn, num_experts: 2, hidden: 4}\n"
                   "routing: {kind: topk, k: 3}\n")  # fmt: skip
    assert main(["demo", "--configs", str(bad), "--tokens", "4", "--batches", "1"]) == 2
    assert "routing.k" in capsys.readouterr().err
