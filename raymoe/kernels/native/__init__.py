"""CPU kernels in C for the steps torch runs op by op: canonical top-k, product-key pair
selection, and PEER's gather-dot-activation-scale-sum (``peer.c``); the router's split of a
batch into sub-batches, and the places digests (``dispatch.c``).

Each equals the torch code it stands in for (the unit tests compare them) and is used only
where it applies (fp32, contiguous, on the CPU); elsewhere, or where no C compiler is found,
the torch code runs. The library is compiled on first use with the machine's ``cc`` into
``$RAYMOE_NATIVE_DIR`` (default ``~/.cache/raymoe/native``), under a name that hashes the
source, the flags and the CPU, so each process of a node loads the same file and a node with
another CPU builds its own. ``RAYMOE_NATIVE=0`` turns the kernels off.

Why: on a 2-core CPU, a 1M-expert PEER layer spent ~40 ms of its ~120 ms per 1,024 tokens
in ``torch.topk`` and its tie checks (16k rows of 1,024 sub-key scores), ~14 ms in the k x k
pair step, and ~40 ms gathering, dotting and summing expert rows through memory several times.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("peer.c", "dispatch.c"))
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
DIR_ENV, SWITCH_ENV = "RAYMOE_NATIVE_DIR", "RAYMOE_NATIVE"
BUILD_TIMEOUT_S = 120.0
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
DIGEST_K = 0x1E3779B97F4A7C15  # of places digests: odd and large, spreads an id over the bits
# below this many elements of work a call runs on the caller's thread alone
PARALLEL_MIN = 1 << 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu() -> str:
    """What the compiled code depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _roots() -> list[Path]:
    """Where the library may go: ``$RAYMOE_NATIVE_DIR``, else the user's cache, else the
    temp dir (a container whose home is read-only)."""
    if os.environ.get(DIR_ENV):
        return [Path(os.environ[DIR_ENV])]
    cache = Path.home() / ".cache" / "raymoe" / "native"
    return [cache, Path(tempfile.gettempdir()) / "raymoe-native"]


def _build() -> Path:
    src = b"".join(f.read_bytes() for f in SOURCES)
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu().encode()).hexdigest()[:16]
    error: OSError | None = None
    for root in _roots():
        out = root / f"raymoe-{key}.so"
        if out.exists():
            return out
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root))
        except OSError as e:  # not writable: the next place
            error = e
            continue
        try:  # each process builds its own, then renames it into place: a reader never
            _compile(tmp / out.name)  # sees half a file
            os.replace(tmp / out.name, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    raise error or OSError("no place to build raymoe's C kernels")


def _compile(out: Path) -> None:
    cmd = ["cc", *FLAGS, "-o", str(out), *map(str, SOURCES), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode:
        raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.rm_topk.argtypes = [p, i64, i64, i64, i64, p, p]
    lib.rm_pk_pairs.argtypes = [p, p, i64, i64, i64, p, p]
    lib.rm_peer.argtypes = [p, p, p, i64, i64, p, p, ctypes.c_int, i64, i64, p]
    lib.rm_split_count.argtypes = [p, p, i64, p, i64, i64, i64, p]
    lib.rm_split_fill.argtypes = [p] * 4 + [i64] * 3 + [p] * 6 + [ctypes.c_uint64, p, p]
    lib.rm_places_digest.argtypes = [p, i64, p, i64, ctypes.c_uint64, p]
    for f in (lib.rm_topk, lib.rm_split_count, lib.rm_places_digest):
        f.restype = ctypes.c_int
    for f in (lib.rm_pk_pairs, lib.rm_peer, lib.rm_split_fill):
        f.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they are off or cannot build."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get(SWITCH_ENV, "1") != "0":
                try:
                    _lib = _declare(ctypes.CDLL(str(_build())))
                except (OSError, subprocess.SubprocessError) as e:
                    log.warning("raymoe's C kernels are off (the torch code runs): %s", e)
            _tried = True
    return _lib


def _forget_threads() -> None:
    """A forked child has none of its parent's threads: it starts a pool of its own."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def _usable(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in ts)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _over_rows(fn, rows: int, work: int) -> None:
    """``fn(r0, r1)`` over ``[0, rows)``: in one call, or split over torch's intra-op thread
    count (the C code holds no GIL) when the work is large enough to pay for the hand-off."""
    n = min(torch.get_num_threads(), rows)
    if n <= 1 or work < PARALLEL_MIN:
        fn(0, rows)
        return
    global _pool, _pool_size
    with _lock:
        if _pool_size < n:  # grows with the thread count
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="raymoe-native"), n
        pool = _pool
    bounds = [rows * i // n for i in range(n + 1)]
    for f in [pool.submit(fn, a, b) for a, b in itertools.pairwise(bounds)]:
        f.result()


def topk(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``flat``: [R, M] fp32, k <= M -> the canonical top-k (values [R, k], indices [R, k]
    int64), or None where the C code does not apply."""
    lib = library()
    if lib is None or flat.dtype != torch.float32 or not _usable(flat) or k > flat.shape[1]:
        return None
    R, M = flat.shape
    vals = flat.new_empty((R, k))
    idx = torch.empty((R, k), dtype=torch.int64)

    def run(a: int, b: int) -> None:
        if lib.rm_topk(_ptr(flat), M, k, a, b, _ptr(vals), _ptr(idx)):
            raise MemoryError("raymoe's top-k kernel: out of memory")

    _over_rows(run, R, R * M)
    return vals, idx


def pk_pairs(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor | None:
    """Product keys: ``v1, v2`` [R, k] descending sub-key scores -> the positions ``a * k +
    b`` [R, k] (int64) of each row's top-k pairs ``v1[a] + v2[b]``, in the canonical order
    over the k x k grid (row-major); None where the C code does not apply."""
    lib = library()
    if lib is None or v1.dtype != torch.float32 or not _usable(v1, v2):
        return None
    R, k = v1.shape
    vals = v1.new_empty((R, k))
    pos = torch.empty((R, k), dtype=torch.int64)

    def run(a: int, b: int) -> None:
        lib.rm_pk_pairs(_ptr(v1), _ptr(v2), k, a, b, _ptr(vals), _ptr(pos))

    _over_rows(run, R, R * k * 4)
    return pos


def peer(x, ids, weights, u, v, act: str) -> torch.Tensor | None:
    """``y[t] = sum_s weights[t, s] act(u[ids[t, s]] . x[t]) v[ids[t, s]]`` (ids < 0 skipped):
    ``x`` [T, d], ``ids``, ``weights`` [T, S], ``u``, ``v`` [E, d] -> [T, d]; None where the
    C code does not apply."""
    lib = library()
    ts = (x, ids, weights, u, v)
    if lib is None or act not in ACTIVATIONS or not _usable(*ts):
        return None
    if any(t.dtype != torch.float32 for t in (x, weights, u, v)) or ids.dtype != torch.int64:
        return None
    T, d = x.shape
    S = ids.shape[1]
    y = torch.empty_like(x)

    def run(a: int, b: int) -> None:
        args = (_ptr(x), _ptr(ids), _ptr(weights), S, d, _ptr(u), _ptr(v), ACTIVATIONS[act])
        lib.rm_peer(*args, a, b, _ptr(y))

    _over_rows(run, T, T * S * d)
    return y


def split(ids, weights, num_shards: int, table=None, place=None) -> list | None:
    """Split routed pairs by shard: ``ids`` [T, S] (int64, -1 empty), ``weights`` [T, S]
    (fp32), and each pair's place packed as shard << 32 | local: looked up in ``table`` [E]
    (each expert's one place), or given as ``place`` [T, S] (-1 empty) -> for each shard
    ``n`` with work, (n, tokens [t_n], local, weights, expert ids, slots [t_n, S_n], places
    digest); None where the C code does not apply (:func:`~raymoe._private.data.dispatch.
    split_by_shard` has the torch code). An id >= E or a shard >= ``num_shards``: IndexError."""
    lib = library()
    given = table if table is not None else place
    if lib is None or weights.dtype != torch.float32 or not _usable(ids, weights, given):
        return None
    if weights.requires_grad:  # the torch split keeps the graph
        return None
    if ids.dtype != torch.int64 or given.dtype != torch.int64:
        return None
    T, S = ids.shape
    N = num_shards
    per = torch.empty((T, N), dtype=torch.int64)
    if table is not None:
        place = torch.empty((T, S), dtype=torch.int64)
    E = 0 if table is None else len(table)
    bad = lib.rm_split_count(
        _ptr(ids), 0 if table is None else _ptr(table), E, _ptr(place), T, S, N, _ptr(per)
    )
    if bad:
        what = "an expert id beyond the table" if bad == 2 else "a shard beyond the placement"
        raise IndexError(f"split: {what}")
    width = per.max(0).values if T else torch.zeros(N, dtype=torch.int64)
    widths, rows = width.tolist(), (per > 0).sum(0).tolist()
    live = [n for n in range(N) if widths[n] > 0]
    outs = {}
    for n in live:
        w_n = widths[n]
        outs[n] = (
            torch.empty(rows[n], dtype=torch.int64),
            torch.empty((rows[n], w_n), dtype=torch.int64),
            torch.empty((rows[n], w_n), dtype=torch.float32),
            torch.empty((rows[n], w_n), dtype=torch.int64),
            torch.empty((rows[n], w_n), dtype=torch.int64),
        )
    pointers = [
        (ctypes.c_void_p * N)(*[(_ptr(outs[n][f]) if n in outs else 0) for n in range(N)])
        for f in range(5)
    ]
    digest = (ctypes.c_int64 * N)()
    scratch = torch.empty(2 * N, dtype=torch.int64)
    inputs = (_ptr(place), _ptr(ids), _ptr(weights), _ptr(per), T, S, N, _ptr(width))
    lib.rm_split_fill(*inputs, *pointers, DIGEST_K, digest, _ptr(scratch))
    return [(n, *outs[n], int(digest[n])) for n in live]


def places_digest(local, experts) -> int | None:
    """The digest of places ``local`` (int64, -1 padding) over ``experts`` [size] (what a
    shard holds at each place); IndexError for a place >= size; None where the C code does
    not apply."""
    lib = library()
    if lib is None or not _usable(local, experts):
        return None
    if local.dtype != torch.int64 or experts.dtype != torch.int64:
        return None
    out = ctypes.c_int64()
    if lib.rm_places_digest(
        _ptr(local), local.numel(), _ptr(experts), len(experts), DIGEST_K, ctypes.byref(out)
    ):
        raise IndexError("places digest: a place beyond the shard's places")
    return out.value
