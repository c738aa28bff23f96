"""Traffic statistics over a window that ends now: kept by each router
(:class:`RouterStats`), merged pool-wide by the controller (:func:`merge`).

A router counts pairs per expert and per shard as batches go out. Every ``BUCKET_S`` the
counts since the last bucket close into a bucket (per shard: dense; per expert: sparse, only
the experts that got pairs), so a window of ``w`` seconds is the sum of the buckets that end
within it plus the open one. Buckets are closed lazily (on the next batch or query), kept for
at most ``HORIZON_S`` and at most ``MAX_ENTRIES`` sparse entries in all (oldest dropped
first); a reply says the window it really covers. Resolution: one bucket.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raymoe.errors import InvalidInputError
from raymoe.placement import Placement
from raymoe.reports import Latency, PoolStats

BUCKET_S = 1.0
HORIZON_S = 3600.0  # the longest window a router can answer
MAX_ENTRIES = 1 << 22  # sparse per-expert entries kept in all buckets of one router
MAX_REQUESTS = 4096  # recent requests kept for latency percentiles
MAX_LOAD_BINS = 4096  # columns of a load map (its rows: the shards)


@dataclass
class _Bucket:
    end: float
    tokens: int
    requests: int
    batches: int
    shard_pairs: np.ndarray  # [N]
    experts: np.ndarray  # [k] ids that got pairs
    pairs: np.ndarray  # [k] how many


class RouterStats:
    """One router's counters. ``clock`` is injectable (tests use a fake one)."""

    def __init__(
        self, num_experts: int, num_shards: int, clock: Callable[[], float] = time.monotonic
    ):
        self.clock = clock
        self.started = clock()
        self.total = np.zeros(num_experts, np.int64)  # pairs per expert, ever
        self._taken = np.zeros(num_experts, np.int64)  # ``total`` at the last take_load
        self._snap = np.zeros(num_experts, np.int64)  # ``total`` when the bucket opened
        self._shard = np.zeros(num_shards, np.int64)  # the open bucket's pairs per shard
        self._open = {"tokens": 0, "requests": 0, "batches": 0}
        self._opened = self.started
        self._last = self.started
        self.buckets: collections.deque[_Bucket] = collections.deque()
        self._entries = 0
        self.requests: collections.deque = collections.deque(maxlen=MAX_REQUESTS)
        self.batch_tokens: collections.deque = collections.deque(maxlen=MAX_REQUESTS)
        self.counters: collections.Counter = collections.Counter()

    def resize(self, num_experts: int, num_shards: int) -> None:
        """Experts were added (counts grow with zeros) or the shard count changed (the open
        bucket closes first, so every bucket has its own shard count)."""
        self._roll(force=True)
        for name in ("total", "_taken", "_snap"):
            old = getattr(self, name)
            new = np.zeros(num_experts, np.int64)
            new[: min(len(old), num_experts)] = old[:num_experts]
            setattr(self, name, new)
        self._shard = np.zeros(num_shards, np.int64)

    def batch(self, experts: np.ndarray, shard_pairs: np.ndarray, tokens: int) -> None:
        """A batch went out: ``experts`` [P] of its pairs, ``shard_pairs`` [N] per shard."""
        self._roll()
        # NOTE: torch's index_add is O(pairs) at any size; np.add.at is far slower
        torch.from_numpy(self.total).index_add_(
            0, torch.from_numpy(experts), torch.ones(len(experts), dtype=torch.int64)
        )
        n = min(len(shard_pairs), len(self._shard))
        self._shard[:n] += shard_pairs[:n]
        self._open["batches"] += 1
        self.batch_tokens.append((self.clock(), tokens))
        self.counters["batches"] += 1

    def served_directly(
        self, experts: np.ndarray, pairs: np.ndarray, shard_pairs: np.ndarray, latency_s: list
    ) -> None:
        """A caller's requests sent straight to the shards, since it last said: ``pairs[i]``
        pairs to expert ``experts[i]``, ``shard_pairs`` [N] per shard, and each request's
        (tokens, seconds) (``latency_s``). Counted as this router's own traffic (the load
        the controller balances), without a batch."""
        self._roll()
        experts, pairs = np.asarray(experts, np.int64), np.asarray(pairs, np.int64)
        known = (experts >= 0) & (experts < len(self.total))  # experts removed since: dropped
        torch.from_numpy(self.total).index_add_(
            0, torch.from_numpy(experts[known]), torch.from_numpy(pairs[known])
        )
        shard_pairs = np.asarray(shard_pairs, np.int64)
        n = min(len(shard_pairs), len(self._shard))
        self._shard[:n] += shard_pairs[:n]
        self.counters["direct_requests"] += len(latency_s)
        for tokens, seconds in latency_s[-MAX_REQUESTS:]:
            self.request(int(tokens), float(seconds))

    def request(self, tokens: int, latency_s: float) -> None:
        now = self.clock()
        self._roll()
        self._open["tokens"] += tokens
        self._open["requests"] += 1
        self._last = now
        self.requests.append((now, tokens, latency_s))

    def take_load(self) -> np.ndarray:
        """[E] pairs per expert since the last call (the controller's load window)."""
        out = self.total - self._taken
        self._taken = self.total.copy()
        return out

    def window(self, window_s: float) -> dict:
        """This router's counts over the last ``window_s`` seconds (ends now)."""
        self._roll()
        now = self.clock()
        window_s = min(window_s, HORIZON_S, max(now - self.started, 1e-3))
        since = now - window_s
        kept = [b for b in self.buckets if b.end > since]
        experts = np.zeros(len(self.total), np.int64)
        np.add.at(
            experts,
            np.concatenate([b.experts for b in kept] or [np.zeros(0, np.int64)]),
            np.concatenate([b.pairs for b in kept] or [np.zeros(0, np.int64)]),
        )
        experts += self.total - self._snap
        shards = [b.shard_pairs for b in kept] + [self._shard]
        pairs = np.zeros(max(len(s) for s in shards), np.int64)
        for s in shards:
            pairs[: len(s)] += s
        recent = [r for r in self.requests if r[0] > since]
        batches = [t for at, t in self.batch_tokens if at > since]
        return {
            "window_s": window_s,
            "tokens": sum(b.tokens for b in kept) + self._open["tokens"],
            "requests": sum(b.requests for b in kept) + self._open["requests"],
            "latency_s": [r[2] for r in recent],
            "batch_tokens": batches,
            "shard_pairs": pairs,
            "expert_load": experts,
            "counters": dict(self.counters),
        }

    def _roll(self, force: bool = False) -> None:
        """Close the open bucket when its time is up (or ``force``); drop old buckets."""
        now = self.clock()
        if not force and now - self._opened < BUCKET_S:
            return
        delta = self.total - self._snap
        hit = np.flatnonzero(delta)
        if hit.size or self._shard.any() or self._open["requests"]:
            end = min(now, max(self._last, self._opened + BUCKET_S))
            self.buckets.append(
                _Bucket(
                    end, **self._open, shard_pairs=self._shard.copy(), experts=hit, pairs=delta[hit]
                )
            )
            self._entries += hit.size
        self._snap = self.total.copy()
        self._shard[:] = 0
        self._open = {"tokens": 0, "requests": 0, "batches": 0}
        self._opened = now
        while self.buckets and (
            self.buckets[0].end < now - HORIZON_S or self._entries > MAX_ENTRIES
        ):
            self._entries -= self.buckets.popleft().experts.size


def merge(windows: list[dict], serving: np.ndarray, num_experts: int, window_s: float) -> PoolStats:
    """Pure: the routers' :meth:`RouterStats.window` answers as one :class:`PoolStats`;
    ``serving`` ([N] bool) marks the shards that hold experts (imbalance is over those)."""
    N = len(serving)
    pairs = np.zeros(N, np.int64)
    experts = np.zeros(num_experts, np.int64)
    counters: collections.Counter = collections.Counter()
    latency, batches = [], []
    for w in windows:
        n = min(len(w["shard_pairs"]), N)
        pairs[:n] += w["shard_pairs"][:n]
        m = min(len(w["expert_load"]), num_experts)
        experts[:m] += w["expert_load"][:m]
        counters.update(w["counters"])
        latency += w["latency_s"]
        batches += w["batch_tokens"]
    covered = max([w["window_s"] for w in windows], default=window_s)
    tokens = sum(w["tokens"] for w in windows)
    lat = None
    if latency:
        ms = np.asarray(latency) * 1000
        lat = Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
    busy = pairs[serving] if serving.any() else pairs
    mean = busy.mean() if len(busy) else 0.0
    return PoolStats(
        window_s=float(covered),
        requests=sum(w["requests"] for w in windows),
        tokens=int(tokens),
        tokens_per_s=float(tokens / covered) if covered > 0 else 0.0,
        latency=lat,
        batch_tokens_mean=float(np.mean(batches)) if batches else None,
        batch_tokens_max=int(max(batches)) if batches else None,
        pairs_per_shard=tuple(int(p) for p in pairs),
        imbalance=float(busy.max() / mean) if mean > 0 else 1.0,
        expert_load=experts,
        counters={k: int(v) for k, v in counters.items()},
    )


def check_load_bins(bins: int) -> None:
    if not 0 < bins <= MAX_LOAD_BINS:
        raise InvalidInputError(f"load_bins must be in [1, {MAX_LOAD_BINS}], got {bins}")


def load_map(expert_load: np.ndarray, placement: Placement, bins: int) -> np.ndarray:
    """Pure: [N, B] pairs per (shard, bin of consecutive experts), ``B = min(bins, E)``; an
    expert's pairs split evenly over its replicas (the routers deal them in turn)."""
    check_load_bins(bins)
    E = placement.num_experts
    B = max(min(bins, E), 1)
    load = np.zeros(E, np.float64)
    n = min(E, len(expert_load))
    load[:n] = expert_load[:n]
    expert, shard = placement.pairs()
    out = np.zeros((placement.num_shards, B), np.float64)
    share = load[expert] / placement.replicas()[expert]
    np.add.at(out, (shard, expert * B // max(E, 1)), share)
    return out
