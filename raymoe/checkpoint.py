"""Checkpoints of a pool, without pickle: one safetensors file per shard and a manifest.

A checkpoint directory holds:

- ``shard-00003.safetensors``: the experts whose first replica lives on shard 3, as
  ``{bank name: [n, ...]}`` plus ``ids`` ([n] flat expert ids); every live expert is in
  exactly one file (removed experts have no rows: they are never routed to);
- ``gate.safetensors``: every layer's gate and shared-expert weights, by pool names;
- ``manifest.json``: the format, the spec (removed and added experts included), the
  placement version the rows were read under, and each file's size and SHA-256.

It is written into a temporary directory beside the target and renamed into place, so a
reader sees a whole checkpoint or none. Reading checks the manifest, every file's size
and hash, and that the rows cover every live expert, before anything is returned: a
truncated, corrupted or mismatched checkpoint raises :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from raymoe.config import PoolSpec
from raymoe.errors import CheckpointError

FORMAT = "raymoe-checkpoint/1"
MANIFEST = "manifest.json"


def write(path: str | Path, spec: PoolSpec, version: int, shards: list[dict], gate: dict) -> dict:
    """Write a checkpoint of ``spec`` at placement ``version``: ``shards[n]`` is
    ``{"ids": [n], name: [n, ...]}``; ``gate`` the gate weights. -> the manifest."""
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} exists and is not a raymoe checkpoint; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        files = {}
        for n, rows in enumerate(shards):
            files[f"shard-{n:05d}.safetensors"] = rows
        files["gate.safetensors"] = gate
        for name, tensors in files.items():
            arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
            save_file(arrays, tmp / name)
        manifest = {
            "format": FORMAT,
            "spec": spec.model_dump(mode="json"),
            "placement_version": version,
            "files": {name: _digest(tmp / name) for name in sorted(files)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if path.exists():  # an older checkpoint: swap, then drop it
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read(path: str | Path) -> tuple[PoolSpec, dict, dict]:
    """(spec, weights by pool names, manifest) of the checkpoint in ``path``, verified."""
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
    shards = sorted(n for n in manifest["files"] if n.startswith("shard-"))
    rows = [load_file(path / n) for n in shards]
    gate = load_file(path / "gate.safetensors")
    return spec, weights(spec, rows, gate, path), manifest


def weights(spec: PoolSpec, shard_rows: list[dict], gate: dict, where: Path) -> dict:
    """The pool's weights (pool names) from per-shard rows: every live expert exactly once;
    removed experts get zeros (never routed to)."""
    from raymoe._private.data.gates import pool_weights

    ids = np.concatenate([r["ids"] for r in shard_rows]) if shard_rows else np.zeros(0, int)
    live = np.setdiff1d(np.arange(spec.num_experts), np.asarray(spec.removed_ids, np.int64))
    if len(ids) != len(np.unique(ids)) or not np.array_equal(np.sort(ids), live):
        raise CheckpointError(f"checkpoint {where}: its rows do not cover the spec's experts")
    full = [r for r in shard_rows if len(r) > 1]  # a shard holding nothing has only ids
    flat = {}
    for name in (k for k in full[0] if k != "ids"):
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
    if not isinstance(files, dict) or "gate.safetensors" not in files:
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
