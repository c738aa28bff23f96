"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall time (s) of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def interleaved_medians(fns: list[Callable[[], object]], reps: int, warmup: int = 2) -> list:
    """Median wall time (s) of each of ``fns`` over ``reps`` rounds that call each in turn
    (after ``warmup`` rounds): a machine that slows down for a while slows all alike, so
    their ratio holds better than that of timings taken one after the other."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + reps):
        for fn, got in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            if r >= warmup:
                got.append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def threaded(fn: Callable[[], object], threads: int, requests: int, tokens: int) -> float:
    """tokens/s of ``threads`` clients each calling ``fn`` (``tokens`` per call)
    ``requests`` times, all started together."""
    barrier = threading.Barrier(threads + 1)

    def run():
        barrier.wait()
        for _ in range(requests):
            fn()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return threads * requests * tokens / (time.perf_counter() - t0)


def latency_ms(fn: Callable[[], object], n: int = 200, warmup: int = 20) -> dict:
    """p50 and p99 (ms) of ``n`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1000)
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
