"""Where a pool's weights are durable without a copy in the controller: files.

The shards hold the only copy in memory. What is not their seeded init is also on disk, in
the files the goal lists (:attr:`~.goal.Goal.sources`, :attr:`~.goal.Goal.gate_file`):

- the checkpoint the pool was served from, or last saved (``PoolHandle.save``);
- ``{weights_dir}/{pool}/initial/``: a checkpoint of the weights ``serve()`` was given;
- ``{weights_dir}/{pool}/added-v{version}.safetensors``: rows of experts added with their
  weights since the last checkpoint, written before they serve;
- ``{weights_dir}/{pool}/gate-v{version}.safetensors``: the gate after it changed.

A restarted shard reads only its rows, by memory map. Files of the pool's directory that
the goal no longer names are removed (:func:`prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from raymoe import checkpoint
from raymoe._private.control import plans
from raymoe._private.control.goal import Goal
from raymoe._private.data.gates import split_weights
from raymoe.config import PoolSpec
from raymoe.errors import CheckpointError
from raymoe.store import weights_dir


def pool_dir(pool: str, env: dict | None = None) -> Path:
    return weights_dir(env) / pool


def served_with(goal: Goal, weights: dict | None) -> Goal:
    """``goal`` of a new pool served with ``weights`` (pool names): they are written as its
    initial checkpoint, which its shards load and reload from."""
    if not weights:
        return goal
    sources, gate_file = write_initial(goal.spec, goal.placement.version, weights)
    return goal.replace(sources=sources, gate_file=gate_file)


def write_initial(spec: PoolSpec, version: int, weights: dict) -> tuple[tuple[str, ...], str]:
    """Write the weights a pool is served with as its initial checkpoint (the given arrays
    are written as they are: no copy). -> (row files, gate file)."""
    rows, gate = split_weights(spec, weights)
    path = pool_dir(spec.name) / "initial"
    with checkpoint.Writer(path) as w:
        files = {}
        if rows:
            ids = np.setdiff1d(np.arange(spec.num_experts), spec.removed_ids)
            if len(ids) < spec.num_experts:
                rows = {k: np.asarray(v)[ids] for k, v in rows.items()}
            name = checkpoint.shard_file(0)
            files[name] = checkpoint.save_tensors(w.file(name), {"ids": ids, **rows})
        files[checkpoint.GATE] = checkpoint.save_tensors(w.file(checkpoint.GATE), gate)
        manifest = w.commit(spec, version, files)
    return tuple(checkpoint.row_files(path, manifest)), str(path / checkpoint.GATE)


def write_rows(pool: str, version: int, ids: np.ndarray, rows: dict) -> str:
    """Rows of experts ``ids`` (added at placement ``version``) -> the file holding them."""
    path = pool_dir(pool) / f"added-v{version}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(path, {"ids": np.asarray(ids, np.int64), **rows})
    return str(path)


def write_gate(pool: str, version: int, gate: dict) -> str:
    path = pool_dir(pool) / f"gate-v{version}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(path, {k: np.asarray(v) for k, v in gate.items()})
    return str(path)


def read_gate(file: str) -> dict[str, np.ndarray]:
    try:
        return dict(load_file(file))
    except FileNotFoundError:
        raise CheckpointError(f"the pool's gate weights ({file}) are missing") from None
    except Exception as e:
        raise CheckpointError(f"the pool's gate weights ({file}) are unreadable: {e}") from None


def prune(pool: str, keep: list[str]) -> None:
    """Remove the files of ``pool``'s directory that ``keep`` does not name."""
    root = pool_dir(pool)
    kept = {Path(k).resolve() for k in keep}
    for p in root.glob("*") if root.is_dir() else ():
        if p.name.startswith("."):
            continue  # a checkpoint being written
        if p.is_dir():
            if not any(k.is_relative_to(p.resolve()) for k in kept):
                shutil.rmtree(p, ignore_errors=True)
        elif p.resolve() not in kept:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def forget(pool: str) -> None:
    shutil.rmtree(pool_dir(pool), ignore_errors=True)


async def write_checkpoint(path: str, spec: PoolSpec, placement, gate: dict, write_rows):
    """Write a checkpoint of a pool to ``path``: each shard writes the rows of the experts
    whose first replica it holds (``await write_rows(shard, file, ids)`` -> that file's
    entry), then the gate and the manifest. -> (manifest, the goal's sources, gate file)."""
    writer = await asyncio.to_thread(checkpoint.Writer, path)
    with writer:
        files = {}
        for n, ids in enumerate(plans.first_replicas(spec, placement)):
            name = checkpoint.shard_file(n)
            files[name] = await write_rows(n, writer.file(name), ids)
        files[checkpoint.GATE] = await asyncio.to_thread(
            checkpoint.save_tensors, writer.file(checkpoint.GATE), gate
        )
        manifest = await asyncio.to_thread(writer.commit, spec, placement.version, files)
    sources = tuple(checkpoint.row_files(path, manifest))
    return manifest, sources, str(Path(path) / checkpoint.GATE)
