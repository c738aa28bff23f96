"""raymoe.plot draws what it is given (no Ray): the load map, the history, the timeline; and
says what is missing instead of failing deep in matplotlib."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from raymoe import plot
from raymoe.errors import ConfigError
from raymoe.reports import PoolStats

PNG = b"\x89PNG\r\n\x1a\n"


def _stats(E=300, N=4, bins=128, window_s=10.0) -> PoolStats:
    load = np.random.default_rng(0).zipf(1.5, E).clip(max=1000)
    m = np.zeros((N, min(bins, E)))
    m[np.arange(E) % N, np.arange(E) * m.shape[1] // E] += load
    return PoolStats(
        window_s=window_s,
        requests=10,
        tokens=100,
        tokens_per_s=10.0,
        latency=None,
        batch_tokens_mean=None,
        batch_tokens_max=None,
        pairs_per_shard=tuple(int(v) for v in m.sum(1)),
        imbalance=float(m.sum(1).max() / m.sum(1).mean()),
        expert_load=load,
        load_map=m,
    )


def test_load_figure_with_history_writes_a_png(tmp_path):
    history = [(float(t), _stats(window_s=2.0)) for t in range(0, 20, 2)]
    fig = plot.load_figure(_stats(), history, title="t")
    assert len(fig.axes) == 5  # map + colorbar, bars, history + colorbar
    path = plot.save(fig, tmp_path / "load.png")
    assert path.read_bytes()[:8] == PNG


def test_load_figure_needs_a_load_map():
    s = _stats()
    bare = PoolStats(**{**s.__dict__, "load_map": None})
    with pytest.raises(ConfigError, match="load_bins"):
        plot.load_figure(bare)


def test_timeline_marks_each_operation(tmp_path):
    t = np.arange(0, 30, 0.5)
    spans = [plot.Span("rebalance", 5, 6), plot.Span("scale up", 12, 20)]
    fig = plot.timeline_figure(t, 1 + 0.1 * np.sin(t), 100 + t, spans, steady_p99_ms=100.0)
    top, bottom = fig.axes
    assert [a.get_text() for a in top.texts] == ["rebalance", "scale up"]
    assert len(top.patches) == len(bottom.patches) == 2  # one shaded span per operation
    assert plot.save(fig, tmp_path / "timeline.png").read_bytes()[:8] == PNG


def test_bin_experts_keeps_every_pair():
    load = np.arange(10)
    assert plot.bin_experts(load, 3).tolist() == [6, 15, 24]  # 0-3, 4-6, 7-9
    assert plot.bin_experts(load, 64).tolist() == load.tolist()


def test_save_to_a_missing_directory_is_a_typed_error(tmp_path):
    fig = plot.timeline_figure(np.arange(3.0), np.ones(3), np.ones(3))
    with pytest.raises(ConfigError, match="cannot write"):
        plot.save(fig, tmp_path / "no" / "x.png")


def test_without_matplotlib_the_error_says_how_to_install(monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ConfigError, match=r"raymoe\[plot\]"):
        plot.timeline_figure(np.arange(3.0), np.ones(3), np.ones(3))
