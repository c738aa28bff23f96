"""Expert rows keyed by global expert id: the gradients a shard accumulates and the optimizer
state it keeps.

Both are keyed by expert id, not by a shard's local place, so they survive what moves places
around: a bank that grows, an expert freed here and placed elsewhere. Gradients of an expert
that moved away stay here until the next step collects them.

Shapes: n rows, ``[n, ...]`` one expert's slice of a bank parameter.
"""

from __future__ import annotations

import torch

Rows = dict[str, torch.Tensor]
STATE_PREFIX = "opt."  # names of state rows beside a bank's: opt.<state>.<name>, opt.step
STEP = STATE_PREFIX + "step"


def _merge(ids: torch.Tensor, rows: Rows, new_ids: torch.Tensor, new: Rows):
    """Rows of ``ids`` plus rows of ``new_ids`` (repeats allowed): -> (sorted unique ids,
    their summed rows)."""
    every = torch.cat([ids, new_ids])
    uniq, inverse = torch.unique(every, return_inverse=True)
    out = {}
    for name, r in new.items():
        old = rows.get(name)
        stacked = torch.cat([old, r.to(old.dtype)]) if old is not None else r
        out[name] = stacked.new_zeros((len(uniq), *r.shape[1:])).index_add_(0, inverse, stacked)
    return uniq, out


def find(held: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``ids`` [n] is in the sorted ``held`` -> (position [n], found [n])."""
    if not len(held):
        return torch.zeros(len(ids), dtype=torch.int64), torch.zeros(len(ids), dtype=torch.bool)
    at = torch.searchsorted(held, ids).clamp(max=len(held) - 1)
    return at, held[at] == ids


class RowGrads:
    """Accumulated gradients of expert rows: sorted ``ids`` [n] and ``rows`` {name: [n, ...]}."""

    def __init__(self):
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.rows: Rows = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: torch.Tensor, rows: Rows) -> None:
        """Add the gradients ``rows`` of experts ``ids`` ([n], repeats allowed)."""
        ids = ids.to(torch.int64)
        if not len(ids):
            return
        if not len(self.ids) and bool((ids[1:] > ids[:-1]).all()):  # sorted and unique
            self.ids, self.rows = ids, dict(rows)  # NOTE: the common case; no copy
            return
        self.ids, self.rows = _merge(self.ids, self.rows, ids, rows)

    def get(self, ids: torch.Tensor, like: Rows | None = None) -> Rows:
        """The gradients of ``ids`` (zeros for ids with none; ``like`` gives the shapes when
        nothing is held)."""
        like = self.rows or like or {}
        out = {k: v.new_zeros((len(ids), *v.shape[1:])) for k, v in like.items()}
        at, found = self._find(ids)
        for k, v in self.rows.items():
            out[k][found] = v[at[found]]
        return out

    def take(self, ids: torch.Tensor, like: Rows | None = None) -> Rows:
        """:meth:`get`, and forget those ids."""
        if torch.equal(ids, self.ids):  # all of them, in order: no copy
            out, self.ids, self.rows = self.rows, self.ids[:0], {}
            return out
        out = self.get(ids, like)
        self.drop(ids)
        return out

    def drop(self, ids: torch.Tensor | None = None) -> None:
        """Forget the gradients of ``ids`` (all of them when None)."""
        if ids is None:
            self.ids, self.rows = self.ids[:0], {}
            return
        keep = ~torch.isin(self.ids, ids)
        self.ids = self.ids[keep]
        self.rows = {k: v[keep] for k, v in self.rows.items()} if len(self.ids) else {}

    def square_sum(self) -> float:
        return float(sum(v.double().square().sum() for v in self.rows.values()))

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return find(self.ids, ids)


class RowState:
    """Lazy per-row optimizer state: rows exist only for experts a step has touched.

    ``ids`` [n] sorted expert ids; ``slot`` [n] their rows in the tensors; ``tensors``
    {state name: {param name: [capacity, ...]}}; ``steps`` [capacity] each row's step count.
    Freed slots are reused.
    """

    GROWTH = 1.5

    def __init__(self):
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.slot = torch.zeros(0, dtype=torch.int64)
        self.free = torch.zeros(0, dtype=torch.int64)
        self.tensors: dict[str, Rows] = {}
        self.steps = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        """Bytes held by the state tensors (capacity included)."""
        held = sum(t.numel() * t.element_size() for s in self.tensors.values() for t in s.values())
        return held + self.steps.numel() * 8

    def slots(self, ids: torch.Tensor, names: tuple[str, ...], like: Rows) -> torch.Tensor:
        """The slots of ``ids`` ([n], sorted unique), created (zero state, step 0) for ids
        without one; ``names``: the state tensors, shaped like the parameter rows ``like``."""
        for s in names:
            if s not in self.tensors:
                cap = len(self.steps)
                self.tensors[s] = {k: v.new_zeros((cap, *v.shape[1:])) for k, v in like.items()}
        at, found = self._find(ids)
        new = ids[~found]
        if len(new):
            self._add(new)
            at, found = self._find(ids)
        return self.slot[at]

    def _add(self, new: torch.Tensor) -> None:
        need = len(new) - len(self.free)
        if need > 0:
            self._grow(need)
        got, self.free = self.free[: len(new)], self.free[len(new) :]
        for s in self.tensors.values():
            for t in s.values():
                t[got] = 0
        self.steps[got] = 0
        ids = torch.cat([self.ids, new])
        order = torch.argsort(ids)
        self.ids, self.slot = ids[order], torch.cat([self.slot, got])[order]

    def _grow(self, need: int) -> None:
        cap = len(self.steps)
        size = max(cap + need, int(cap * self.GROWTH))
        for s in self.tensors.values():
            for k, t in s.items():
                s[k] = torch.cat([t, t.new_zeros((size - cap, *t.shape[1:]))])
        self.steps = torch.cat([self.steps, self.steps.new_zeros(size - cap)])
        self.free = torch.cat([self.free, torch.arange(cap, size)])

    def export(self, ids: torch.Tensor) -> Rows:
        """The state of ``ids`` as flat rows ``{"opt.<state>.<name>": [n, ...], "opt.step":
        [n]}`` (zeros and step 0 for ids without state); {} when none is held here."""
        if not len(self.ids):
            return {}
        at, found = self._find(ids)
        slot = self.slot[at]
        out = {STEP: torch.where(found, self.steps[slot], 0)}
        for s, rows in self.tensors.items():
            for k, t in rows.items():
                mask = found.view(-1, *([1] * (t.dim() - 1)))
                out[f"{STATE_PREFIX}{s}.{k}"] = torch.where(mask, t[slot], 0)
        return out

    def load(self, ids: torch.Tensor, rows: Rows) -> None:
        """Take the state of ``ids`` from rows of :meth:`export`; rows at step 0 (no state
        where they came from) drop any state held here."""
        steps = rows.get(STEP)
        if steps is None:
            return
        steps = torch.as_tensor(steps, dtype=torch.int64)
        self.drop(ids[steps == 0])
        has = steps > 0
        if not bool(has.any()):
            return
        ids, order = torch.sort(ids[has])
        picked = {k: torch.as_tensor(v)[has][order] for k, v in rows.items()}
        names: dict[str, Rows] = {}
        for key, v in picked.items():
            if key != STEP:
                _, s, k = key.split(".", 2)
                names.setdefault(s, {})[k] = v
        like = next(iter(names.values()))
        slot = self.slots(ids, tuple(names), like)
        for s, group in names.items():
            for k, v in group.items():
                self.tensors[s][k][slot] = v.to(self.tensors[s][k].dtype)
        self.steps[slot] = picked[STEP]

    def drop(self, ids: torch.Tensor) -> None:
        """Forget the state of ``ids`` (their slots are reused)."""
        if not len(self.ids) or not len(ids):
            return
        gone = torch.isin(self.ids, ids)
        self.free = torch.cat([self.free, self.slot[gone]])
        self.ids, self.slot = self.ids[~gone], self.slot[~gone]

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return find(self.ids, ids)
