"""Starting and finding pools on Ray: ``serve`` one, ``resume`` it after its cluster
restarted, ``connect`` to a running one. Each returns a :class:`~raymoe.api.PoolHandle`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import ray

from raymoe._private import actors
from raymoe._private.control import durable
from raymoe._private.control.goal import Goal
from raymoe.api import PoolHandle, as_numpy
from raymoe.config import PoolSpec, load_spec
from raymoe.errors import CheckpointError, ConfigError, PoolExistsError, PoolNotFoundError
from raymoe.store import open_store


def serve(
    spec: PoolSpec | dict | str | Path | None = None,
    weights: dict | None = None,
    name: str | None = None,
    checkpoint: str | Path | None = None,
) -> PoolHandle:
    """Start a pool for ``spec`` (and ``weights`` in neutral names); starts local Ray if needed.

    Given ``weights``, the pool writes them once as its initial checkpoint (under
    ``$RAYMOE_WEIGHTS_DIR``), which its shards load and reload from: no process keeps a
    second copy. With ``checkpoint`` (a directory :meth:`PoolHandle.save` wrote), the
    pool's experts, ids and weights are the checkpoint's, read in place by the shards;
    ``spec``, if given, sets the rest (shards, control, gateway, limits: onto another shard
    count too) and must describe the same model. A missing, corrupted or mismatched
    checkpoint raises :class:`CheckpointError` before anything starts. Raises
    :class:`PoolExistsError` when a pool of that name already runs.
    """
    if checkpoint is not None:
        spec, goal = _restored(spec, name, checkpoint)
    elif spec is None:
        raise ConfigError("serve() needs a spec or a checkpoint")
    else:
        spec = load_spec(spec)
        spec = spec.with_name(name) if name is not None else spec
        _init_ray()
        _not_running(spec.name)
        np_weights = {k: as_numpy(v) for k, v in (weights or {}).items()}
        goal = durable.served_with(Goal.initial(spec), np_weights or None)
    return _start(goal)


def resume(name: str = "default") -> PoolHandle:
    """Bring back pool ``name`` after its Ray cluster restarted, from its saved state (Redis
    at ``$RAYMOE_REDIS_URL``, or the embedded store) and its weight files: the same experts
    (added and removed ones included), weights, pins and placement version. A change that
    was under way when the cluster went down is dropped (it was never acknowledged)."""
    try:
        goal = Goal.load(open_store(), name)
    except LookupError:
        raise PoolNotFoundError(f"no saved state for a raymoe pool named {name!r}") from None
    _init_ray()
    _not_running(name)
    return _start(goal.replace(pending=None, pending_spec=None))


def _init_ray() -> None:
    if not ray.is_initialized():
        ray.init(namespace=actors.NAMESPACE, include_dashboard=False, log_to_driver=False)


def _not_running(name: str) -> None:
    try:
        actors.get_controller(name)
    except ValueError:
        return
    raise PoolExistsError(
        f"a raymoe pool named {name!r} already runs; connect() to it or shut it down first"
    )


def _start(goal: Goal) -> PoolHandle:
    controller = actors.start_controller(goal.spec)
    try:
        actors.wait(controller.start.remote(goal))
    except BaseException:
        with contextlib.suppress(Exception):
            actors.wait(controller.shutdown.remote())
        actors.kill([controller])
        raise
    return PoolHandle(goal.spec.name, controller, actors.wait(controller.routers.remote()))


def _restored(spec, name, path) -> tuple[PoolSpec, Goal]:
    """(spec, goal) to serve checkpoint ``path`` with, ``spec``'s deployment sections: the
    shards read their rows from the checkpoint's files."""
    from raymoe import checkpoint

    path = Path(path).resolve()
    saved, manifest = checkpoint.verify(path)
    spec = saved if spec is None else _merged(load_spec(spec), saved, path)
    spec = spec.with_name(name) if name is not None else spec
    _init_ray()
    _not_running(spec.name)
    goal = Goal.initial(spec).replace(
        sources=tuple(checkpoint.row_files(path, manifest)),
        gate_file=str(path / checkpoint.GATE),
    )
    return spec, goal


def _merged(spec: PoolSpec, saved: PoolSpec, path: Path) -> PoolSpec:
    """``saved`` (the checkpoint's model) with ``spec``'s deployment sections."""
    model = ("d_model", "dtype", "num_layers")
    for field in model:
        if getattr(spec, field) != getattr(saved, field):
            raise CheckpointError(
                f"checkpoint {path} holds a model with {field}={getattr(saved, field)}, "
                f"the spec has {getattr(spec, field)}"
            )
    if spec.experts.kind != saved.experts.kind:
        raise CheckpointError(f"checkpoint {path} holds {saved.experts.kind} experts")
    deploy = ("name", "shards", "control", "gateway", "limits")
    return PoolSpec.from_dict(
        {**saved.model_dump(mode="json"), **{k: spec.model_dump(mode="json")[k] for k in deploy}}
    )


def connect(name: str = "default", *, direct: bool = True) -> PoolHandle:
    """A handle to the running pool ``name`` (from any driver, task or actor in the cluster).
    ``direct=False``: every request goes through a router, small ones too (they are batched
    with other callers' there, rather than sent straight to the shards)."""
    if not ray.is_initialized():
        ray.init(address="auto", namespace=actors.NAMESPACE, log_to_driver=False)
    try:
        controller = actors.get_controller(name)
    except ValueError:
        raise PoolNotFoundError(f"no raymoe pool named {name!r} runs in this cluster") from None
    return PoolHandle(name, controller, actors.wait(controller.routers.remote()), direct)
