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
