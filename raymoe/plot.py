"""Pictures of a pool: where its load falls (:func:`load_figure`) and what operations did to
it over time (:func:`timeline_figure`). matplotlib is an optional extra
(``pip install 'raymoe[plot]'``); figures are drawn without pyplot, so no GUI backend is
touched and they are safe in threads and on headless machines.

- :func:`load_figure`: a heat map of the load map (shard x bins of experts, pairs/s), the
  pairs per shard beside it, and, given samples, the expert load over time (time x bins).
- :func:`timeline_figure`: imbalance and latency p99 over time, each operation a shaded span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.errors import ConfigError
from raymoe.reports import PoolStats

INSTALL = "pip install 'raymoe[plot]'"


@dataclass(frozen=True)
class Span:
    """An operation on a timeline: it ran from ``start`` to ``end`` (seconds)."""

    label: str
    start: float
    end: float


def load_figure(stats: PoolStats, history: Sequence[tuple[float, PoolStats]] = (), title=""):
    """``stats`` with its ``load_map``; ``history``: (seconds, stats) samples, oldest first
    (two or more add the load over time). -> a matplotlib Figure."""
    if stats.load_map is None:
        raise ConfigError("the stats have no load map: ask for them with load_bins", "stats")
    Figure = _figure_class()
    rows = 2 if len(history) >= 2 else 1
    fig = Figure(figsize=(11, 3.2 + 2.2 * rows + 0.12 * len(stats.load_map)), layout="constrained")
    grid = fig.add_gridspec(rows, 2, width_ratios=(5, 1))
    per_s = stats.load_map / max(stats.window_s, 1e-9)
    E = len(stats.expert_load)
    ax = fig.add_subplot(grid[0, 0])
    image = ax.imshow(per_s, aspect="auto", interpolation="nearest", cmap="magma")
    _expert_axis(ax, E, per_s.shape[1])
    ax.set_ylabel("shard")
    ax.set_yticks(range(len(per_s)))
    ax.set_title(
        f"load by shard and expert, last {stats.window_s:.0f} s "
        f"(imbalance {stats.imbalance:.2f}, {stats.tokens_per_s:.0f} tokens/s)"
    )
    fig.colorbar(image, ax=ax, label="pairs/s", pad=0.01)
    bars = fig.add_subplot(grid[0, 1], sharey=ax)
    bars.barh(range(len(per_s)), per_s.sum(axis=1), color="#555")
    bars.set_xlabel("pairs/s")
    bars.tick_params(labelleft=False)
    if rows == 2:
        _history(fig.add_subplot(grid[1, :]), history, per_s.shape[1])
    if title:
        fig.suptitle(title)
    return fig


def timeline_figure(
    t: np.ndarray,
    imbalance: np.ndarray,
    p99_ms: np.ndarray,
    spans: Sequence[Span] = (),
    *,
    steady_p99_ms: float | None = None,
    title: str = "",
):
    """Imbalance and p99 latency sampled at times ``t`` (seconds); each of ``spans`` shaded
    and labelled. -> a matplotlib Figure."""
    Figure = _figure_class()
    fig = Figure(figsize=(11, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(t, imbalance, color="#1f77b4", lw=1.5)
    top.axhline(1.0, color="#999", lw=0.8, ls=":")
    top.set_ylabel("imbalance (max / mean shard)")
    bottom.plot(t, p99_ms, color="#d62728", lw=1.5)
    if steady_p99_ms:
        bottom.axhline(steady_p99_ms, color="#999", lw=0.8, ls="--", label="steady p99")
        bottom.axhline(2 * steady_p99_ms, color="#999", lw=0.8, ls=":", label="2x steady")
        bottom.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("latency p99 (ms)")
    bottom.set_xlabel("seconds")
    for i, span in enumerate(spans):
        for ax in (top, bottom):
            ax.axvspan(span.start, max(span.end, span.start + 0.2), color="#2ca02c", alpha=0.18)
        top.annotate(
            span.label,
            (span.start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -10 - 11 * (i % 3)),
            textcoords="offset points",
            fontsize=8,
            va="top",
        )
    if title:
        fig.suptitle(title)
    return fig


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}", "out") from None
    return path


def bin_experts(load: np.ndarray, bins: int) -> np.ndarray:
    """[E] -> [min(bins, E)] sums over bins of consecutive experts (``e * B // E``)."""
    E = len(load)
    B = max(min(bins, E), 1)
    return np.bincount(np.arange(E) * B // max(E, 1), weights=load, minlength=B)


def _history(ax, history, bins: int) -> None:
    t0 = history[0][0]
    rows = [bin_experts(s.expert_load, bins) / max(s.window_s, 1e-9) for _, s in history]
    times = [t - t0 for t, _ in history]
    image = ax.imshow(
        np.stack(rows),
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(-0.5, bins - 0.5, times[-1], times[0] - history[0][1].window_s),  # row: window
    )
    _expert_axis(ax, len(history[-1][1].expert_load), bins)
    ax.set_ylabel("seconds (each row: the window ending there)")
    ax.set_title("expert load over time")
    ax.figure.colorbar(image, ax=ax, label="pairs/s", pad=0.01)


def _expert_axis(ax, num_experts: int, bins: int) -> None:
    """Label the x axis with expert ids (each column a bin of ``e * B // E``)."""
    ticks = np.unique(np.linspace(0, bins - 1, min(bins, 9)).round().astype(int))
    first = -(-ticks * num_experts // bins)  # the first expert of each bin: ceil(b * E / B)
    ax.set_xticks(ticks, [str(e) for e in first])
    ax.set_xlabel("expert" if bins == num_experts else f"expert ({bins} bins)")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"plots need matplotlib: {INSTALL}", "matplotlib") from None
    return Figure
