"""Checkpoints of a pool, without pickle: one safetensors file per shard and a manifest.

A checkpoint directory holds:

- ``shard-00003.safetensors``: the experts whose first replica lives on shard 3, as
  ``{bank name: [n, ...]}`` plus ``ids`` ([n] flat expert ids); every live expert is in
  exactly one file (removed experts have no rows: they are never routed to);
- ``gate.safetensors``: every layer's gate and shared-expert weights, by pool names;
- ``manifest.json``: the format, the spec (removed and added experts included), the
  placement version the rows were read under, and each file's size and SHA-256.

It is written into a temporary directory beside the target and renamed into place, so a
reader sees a whole checkpoint or none; each shard writes its own file, streamed and hashed
as it goes (:func:`write_tensors`). :func:`verify` checks the manifest, every file's size
and hash, and that the rows cover every live expert, reading no rows: a truncated,
corrupted or mismatched checkpoint raises :class:`CheckpointError`. A pool's shards read
their own rows in place (:class:`RowFile`); the same row files hold experts added since
the last checkpoint (see ``raymoe._private.control.durable``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from raymoe.config import PoolSpec
from raymoe.errors import CheckpointError
from raymoe.optim.rows import STATE_PREFIX

FORMAT = "raymoe-checkpoint/1"
MANIFEST = "manifest.json"
GATE = "gate.safetensors"
PIECE_BYTES = 64 << 20  # written, hashed or read at a time
_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_NUMPY = {v: np.dtype(k) for k, v in _DTYPES.items()}


def shard_file(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


def write(path: str | Path, spec: PoolSpec, version: int, shards: list[dict], gate: dict) -> dict:
    """Write a checkpoint of ``spec`` at placement ``version``: ``shards[n]`` is
    ``{"ids": [n], name: [n, ...]}``; ``gate`` the gate weights. -> the manifest."""
    with Writer(path) as w:
        files = {
            shard_file(n): save_tensors(w.file(shard_file(n)), rows)
            for n, rows in enumerate(shards)
        }
        files[GATE] = save_tensors(w.file(GATE), gate)
        return w.commit(spec, version, files)


class Writer:
    """A checkpoint being written: files go to a temporary directory beside ``path``
    (:meth:`file`, written by anyone who can reach it: shards write their own rows);
    :meth:`commit` adds the manifest and renames it into place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not (self.path / MANIFEST).is_file():
            raise CheckpointError(f"{path} exists and is not a raymoe checkpoint; not replacing it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # nothing left once committed

    def file(self, name: str) -> str:
        return str(self.tmp / name)

    def commit(self, spec: PoolSpec, version: int, files: dict[str, dict]) -> dict:
        """Write the manifest (``files``: name -> size and SHA-256), fsync, rename into
        place (an older checkpoint there is swapped out). -> the manifest."""
        manifest = {
            "format": FORMAT,
            "spec": spec.model_dump(mode="json"),
            "placement_version": version,
            "files": dict(sorted(files.items())),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(self.tmp)
        path = self.path
        if path.exists():  # an older checkpoint: swap, then drop it
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(self.tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, path)
        return manifest


# --- safetensors, streamed ------------------------------------------------------------------


def save_tensors(file: str | Path, arrays: dict[str, np.ndarray]) -> dict:
    """Write ``arrays`` as one safetensors file without a second copy in memory.
    -> its size and SHA-256 (hashed as written)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    layout = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    return write_tensors(file, layout, lambda name: iter([arrays[name]]))


def write_tensors(
    file: str | Path,
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]],
    pieces: Callable[[str], Iterator[np.ndarray]],
) -> dict:
    """A safetensors file of tensors ``layout`` (name -> dtype, shape) whose data come as
    ``pieces(name)`` (row blocks in order), so a large tensor is never whole in memory.
    -> size and SHA-256."""
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _DTYPES[np.dtype(dtype).name],
            "shape": [int(x) for x in shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(file, "wb") as f:
        for part in (len(text).to_bytes(8, "little"), text):
            h.update(part)
            f.write(part)
        for name in layout:
            got = 0
            for piece in pieces(name):
                data = memoryview(np.ascontiguousarray(piece)).cast("B")
                for i in range(0, len(data), PIECE_BYTES):
                    h.update(data[i : i + PIECE_BYTES])
                    f.write(data[i : i + PIECE_BYTES])
                got += len(data)
            begin, end = header[name]["data_offsets"]
            if got != end - begin:
                raise ValueError(f"{name}: {got} bytes written, {end - begin} expected")
        f.flush()
        os.fsync(f.fileno())
        return {"bytes": f.tell(), "sha256": h.hexdigest()}


class RowFile:
    """A safetensors file of expert rows (``ids`` and ``{name: [n, ...]}``). Rows are read
    through a memory map made for each read and dropped after it: only the pages of those
    rows are touched, and none stay mapped (or counted in the reader's memory)."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        try:
            with open(self.file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            size = self.file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"weight file {file} is missing") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"weight file {file} is unreadable: {e}") from None
        header.pop("__metadata__", None)
        self._layout: dict[str, tuple[np.dtype, int, tuple[int, ...]]] = {}
        try:
            for name, t in header.items():
                begin, end = t["data_offsets"]
                if 8 + n + end > size:
                    raise CheckpointError(f"weight file {file} is truncated")
                self._layout[name] = (_NUMPY[t["dtype"]], 8 + n + begin, tuple(t["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"weight file {file} has a malformed header: {e}") from None
        if "ids" not in self._layout:
            raise CheckpointError(f"weight file {file} holds no expert ids")
        self.ids = np.array(self._map("ids"), np.int64)
        del self._layout["ids"]

    def _map(self, name: str) -> np.ndarray:
        dtype, offset, shape = self._layout[name]
        if not int(np.prod(shape)):
            return np.zeros(shape, dtype)
        return np.memmap(self.file, dtype, "r", offset, shape)

    @property
    def names(self) -> list[str]:
        return list(self._layout)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: [len(index), ...]}``: copies of the rows at positions ``index``."""
        return {k: np.asarray(self._map(k)[index]) for k in self._layout}

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *exc) -> None:
        pass


def rows_per_piece(row_bytes: int) -> int:
    return max(1, PIECE_BYTES // max(row_bytes, 1))


def verify(path: str | Path) -> tuple[PoolSpec, dict]:
    """(spec, manifest) of the checkpoint in ``path`` once every file's size and SHA-256
    match the manifest and its rows cover the spec's live experts exactly once; reads the
    rows' ids only, never the rows."""
    path = Path(path)
    manifest = _manifest(path)
    for name, want in manifest["files"].items():
        got = _digest(path / name) if (path / name).is_file() else None
        if got is None:
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if got != want:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or corrupted")
    try:
        spec = PoolSpec.from_dict(manifest["spec"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: its spec is invalid: {e}") from None
    ids = [RowFile(f).ids for f in row_files(path, manifest)]
    _check_cover(spec, np.concatenate(ids) if ids else np.zeros(0, np.int64), path)
    return spec, manifest


def row_files(path: str | Path, manifest: dict) -> list[str]:
    """The expert-row files of a checkpoint, in shard order."""
    return [str(Path(path) / n) for n in sorted(manifest["files"]) if n.startswith("shard-")]


def read(path: str | Path) -> tuple[PoolSpec, dict, dict]:
    """(spec, weights by pool names, manifest) of the checkpoint in ``path``, verified."""
    path = Path(path)
    spec, manifest = verify(path)
    rows = [load_file(f) for f in row_files(path, manifest)]
    gate = load_file(path / GATE)
    return spec, weights(spec, rows, gate, path), manifest


def _check_cover(spec: PoolSpec, ids: np.ndarray, where: Path) -> None:
    live = np.setdiff1d(np.arange(spec.num_experts), np.asarray(spec.removed_ids, np.int64))
    if len(ids) != len(np.unique(ids)) or not np.array_equal(np.sort(ids), live):
        raise CheckpointError(f"checkpoint {where}: its rows do not cover the spec's experts")


def weights(spec: PoolSpec, shard_rows: list[dict], gate: dict, where: Path) -> dict:
    """The pool's weights (pool names) from per-shard rows: every live expert exactly once;
    removed experts get zeros (never routed to)."""
    from raymoe._private.data.gates import pool_weights

    ids = np.concatenate([r["ids"] for r in shard_rows]) if shard_rows else np.zeros(0, int)
    _check_cover(spec, ids, where)
    full = [r for r in shard_rows if len(r) > 1]  # a shard holding nothing has only ids
    flat = {}
    # NOTE: optimizer state (``opt.*``, only in files of shards that stepped) is the
    # shards' to load, not a weight
    for name in (k for k in full[0] if k != "ids" and not k.startswith(STATE_PREFIX)):
        first = full[0][name]
        out = np.zeros((spec.num_experts, *first.shape[1:]), first.dtype)
        for r in full:
            out[r["ids"]] = r[name]
        flat[name] = out
    per_layer = []
    for i in range(spec.num_layers):
        own = spec.flat.ids(i) if spec.multi_layer else np.arange(spec.num_experts)
        per_layer.append({f"experts.{k}": v[own] for k, v in flat.items()})
    out = pool_weights(spec, per_layer)
    out.update(gate)
    return out


def _manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a raymoe checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format (want {FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict) or GATE not in files:
        raise CheckpointError(f"checkpoint {path}: the manifest lists no files")
    return manifest


def _digest(file: Path) -> dict:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": file.stat().st_size, "sha256": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
