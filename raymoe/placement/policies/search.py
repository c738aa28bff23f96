"""Local search on a placement's hottest shard: the step that takes a greedy packing to
near-optimal (``balanced``'s last stage).

Each step looks at the most loaded shard ``m`` and takes the best of:

- a *move*: a replica of ``m`` to a shard with a free place that does not hold its expert;
- a *swap*: a replica of ``m`` with a lighter one elsewhere (neither expert held twice);
- a *split*: one more replica of an expert on ``m`` (when the budget has one to spare),
  which lightens every replica of that expert;
- a *merge*: one replica fewer of an expert elsewhere, to free a place or a replica for a
  split that needs it.

A step is taken only when it leaves both shards it touches below ``m``'s load (or, for
splits and merges, lowers the maximum), so each one lowers the maximum or the number of
shards at it; the search ends when no step does, at the target, or after ``steps``.
Candidates are scored with numpy: a step costs O(R + a * b) for the ``a`` heaviest
replicas on ``m`` and the ``b`` candidates elsewhere, both bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.placement.budget import Budget

MAX_ON_HOT = 64  # replicas of the hottest shard tried per step (the heaviest ones)
MAX_PARTNERS = 1 << 16  # swap partners scored per step (the heaviest elsewhere)
EPS = 1e-12


@dataclass
class State:
    """A placement under search. Shapes: R replicas searched, N shards, E experts.

    With ``fixed`` (a :class:`~.repair.Movable`'s base and replica counts), only the given
    replicas are searched, the others' load is a fixed base, and counts do not change (no
    splits or merges)."""

    load: np.ndarray  # [E]
    expert: np.ndarray  # [R]
    shard: np.ndarray  # [R]
    budget: Budget
    fixed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # reps [E], base, count [N]
    origin: np.ndarray | None = None  # [R] shard each replica had before the plan (-1: new)

    def __post_init__(self) -> None:
        N = self.budget.num_shards
        if self.fixed is None:
            self.reps = np.bincount(self.expert, minlength=len(self.load))
            base, base_count = np.zeros(N), np.zeros(N, np.int64)
        else:
            self.reps, base, base_count = self.fixed
        self.w = self.load[self.expert] / self.reps[self.expert]
        if not hasattr(self, "active"):
            self.active = self.budget.active()
            self.num_active = int(self.active.sum())
            self.limit = self.budget.replica_limit()
        self.sl = base + np.bincount(self.shard, weights=self.w, minlength=N)
        self.sl[~self.active] = 0.0
        self.count = base_count + np.bincount(self.shard, minlength=N)
        self.cap = self.budget.capacity or np.iinfo(np.int64).max
        self.pinned = np.zeros(len(self.load), bool)
        self.pinned[list(self.budget.pins)] = True
        if self.fixed is not None:
            self.pinned[:] = True  # counts are fixed: no splits, no merges

    @classmethod
    def of(cls, load, items, budget: Budget, origin: np.ndarray | None = None) -> State:
        """The search state of a :class:`~.repair.Movable` (its base stays put)."""
        fixed = (items.reps, items.base, items.base_count)
        return cls(load, items.expert, items.shard.copy(), budget, fixed, origin)

    def moved(self) -> int:
        """Replicas away from their place before the plan (new ones included)."""
        return int((self.shard != self.origin).sum())


def kicked_search(state: State, *, target: float, steps: int, kicks: int, seed: int = 0):
    """:func:`search`, then ``kicks`` times: a random swap between two shards and a search
    again, keeping the best placement seen (iterated local search, for small pools)."""
    state = search(state, target=target, steps=steps)
    best = (_score(state), state.expert.copy(), state.shard.copy())
    rng = np.random.default_rng(seed)
    for _ in range(kicks):
        if best[0][0] <= target * (1 + EPS):
            break
        trial = State(state.load, best[1].copy(), best[2].copy(), state.budget)
        for _ in range(2):
            _random_kick(trial, rng)
        trial = search(trial, target=target, steps=steps)
        score = _score(trial)
        if score < best[0]:
            best = (score, trial.expert.copy(), trial.shard.copy())
    return State(state.load, best[1], best[2], state.budget)


def _score(s: State) -> tuple[float, float]:
    sl = s.sl[s.active]
    return float(sl.max()), float((sl**2).sum())


def _random_kick(s: State, rng) -> None:
    """A random swap, split or merge (whichever the budget and places allow)."""
    kind = rng.integers(3)
    if kind == 1 and s.limit > len(s.expert):
        e = int(rng.integers(len(s.load)))
        dst = np.flatnonzero(s.active & (s.count < s.cap))
        dst = dst[~np.isin(dst, s.shard[s.expert == e])]
        if not s.pinned[e] and s.load[e] > 0 and len(dst):
            _split(s, e, int(rng.choice(dst)))
            return
    if kind == 2:
        multi = np.flatnonzero((s.reps[s.expert] > 1) & ~s.pinned[s.expert])
        if len(multi):
            _merge_step(int(rng.choice(multi)))(s)
            return
    _random_swap(s, rng)


def _random_swap(s: State, rng) -> None:
    """Swap two replicas of different shards (when neither expert is held twice after)."""
    for _ in range(8):
        a, b = rng.integers(len(s.expert), size=2)
        sa, sb = s.shard[a], s.shard[b]
        if sa == sb:
            continue
        ea, eb = s.expert[a], s.expert[b]
        if ((s.expert == ea) & (s.shard == sb)).any() or ((s.expert == eb) & (s.shard == sa)).any():
            continue
        _swap(s, int(a), int(b))
        return


def search(state: State, *, target: float, steps: int, moves_left: float = np.inf) -> State:
    """Improve ``state`` in place by steps on its hottest shard (see the module doc);
    ``target`` is a shard load that is good enough; ``moves_left`` the replicas it may put
    at new places (with ``state.origin``: the most that may end away from their origin)."""
    for _ in range(steps):
        m = int(np.argmax(np.where(state.active, state.sl, -np.inf)))
        if state.sl[m] <= target * (1 + EPS):
            break
        left = moves_left - state.moved() if state.origin is not None else moves_left
        step = _best_step(state, m, left)
        if step is None:
            break
        used = step(state)
        if state.origin is None:
            moves_left -= used
    return state


def _best_step(s: State, m: int, moves_left: float):
    """The step that leaves the hottest shard's pair lightest, as a callable; None if none."""
    on = _spread(np.flatnonzero(s.shard == m), s.w, MAX_ON_HOT)
    if not len(on):
        return None
    held = _holders(s, on)  # [a, N] bool
    best = (s.sl[m] * (1 - 1e-9), None)
    if moves_left >= 1:
        best = _best_move(s, m, on, held, best)
    if moves_left >= 2:
        best = _best_swap(s, m, on, held, best)
    if best[1] is None and moves_left >= 1:
        best = _best_split(s, m, on, held, best)
    if best[1] is None:
        best = _best_merge(s, m, on, best)
    if best[1] is None and moves_left >= 2:
        best = _best_split_eject(s, m, on, held, best)
    return best[1]


def _spread(rows: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of ``rows``: the heaviest half, and the rest spread evenly over the
    lighter ones (fine steps need light replicas; big ones need heavy)."""
    if len(rows) <= k:
        return rows[np.argsort(-w[rows], kind="stable")]
    rows = rows[np.argsort(-w[rows], kind="stable")]
    half = k // 2
    rest = np.linspace(half, len(rows) - 1, k - half).astype(np.int64)
    return rows[np.unique(np.concatenate([np.arange(half), rest]))]


def _holders(s: State, on: np.ndarray) -> np.ndarray:
    """[a, N] whether each shard holds the expert of each replica in ``on``."""
    N = s.budget.num_shards
    out = np.zeros((len(on), N), bool)
    multi = np.flatnonzero(s.reps[s.expert[on]] > 1)
    out[np.arange(len(on)), s.shard[on]] = True
    for i in multi.tolist():  # NOTE: only the replicated experts, a few
        out[i, s.shard[s.expert == s.expert[on[i]]]] = True
    return out


def _best_move(s: State, m: int, on, held, best):
    ok = s.active & (s.count < s.cap)
    ok[m] = False
    cand = ok[None, :] & ~held  # [a, N]
    if not cand.any():
        return best
    new_dst = s.sl[None, :] + s.w[on][:, None]
    new_src = s.sl[m] - s.w[on]
    pair_max = np.maximum(new_dst, new_src[:, None])
    pair_max[~cand] = np.inf
    i, n = np.unravel_index(int(np.argmin(pair_max)), pair_max.shape)
    if pair_max[i, n] < best[0]:
        r = int(on[i])
        return pair_max[i, n], lambda st: _move(st, r, int(n))
    return best


def _best_swap(s: State, m: int, on, held, best):
    others = np.flatnonzero((s.shard != m) & s.active[s.shard])
    others = others[s.w[others] < s.w[on].max()]
    if not len(others):
        return best
    others = _spread(others, s.w, max(1, MAX_PARTNERS // len(on)))
    on_m = np.zeros(len(s.load), bool)
    on_m[s.expert[s.shard == m]] = True
    ok_b = ~on_m[s.expert[others]]  # b's expert must not already be on m
    wa, wb = s.w[on][:, None], s.w[others][None, :]
    sb = s.shard[others]
    new_m = s.sl[m] - wa + wb
    new_s = s.sl[sb][None, :] - wb + wa
    pair_max = np.maximum(new_m, new_s)
    bad = ~ok_b[None, :] | held[:, sb] | (wb >= wa)
    pair_max[bad] = np.inf
    i, j = np.unravel_index(int(np.argmin(pair_max)), pair_max.shape)
    if pair_max[i, j] < best[0]:
        a, b = int(on[i]), int(others[j])
        return pair_max[i, j], lambda st: _swap(st, a, b)
    return best


def _best_split(s: State, m: int, on, held, best):
    """One more replica of an expert on ``m``, where it lowers the hottest load; with no
    replica to spare, paid for by one replica fewer of the lightest replicated expert
    (whose freed place the new replica may take)."""
    spare = s.limit - len(s.expert)
    for i in np.argsort(-s.w[on], kind="stable")[:8].tolist():
        r = int(on[i])
        e = int(s.expert[r])
        if s.pinned[e] or s.reps[e] >= s.num_active:
            continue
        ok = s.active & (s.count < s.cap)
        victim, base = None, s.sl
        if spare <= 0:
            victim = _merge_victim(s, e)
            if victim is None:
                continue
            base, freed = _merge_loads(s, victim)
            ok = ok.copy()
            ok[freed] = s.active[freed]
        dst = np.flatnonzero(ok & ~held[i])
        if not len(dst):
            continue
        n = int(dst[np.argmin(base[dst])])
        after = _split_loads(s, e, n, base)
        touched = np.abs(after - s.sl) > 0
        worst = after[touched].max() if touched.any() else np.inf
        if worst < best[0]:  # every shard it touches ends below the hottest one
            step = _split_step(e, n) if victim is None else _split_merge(e, n, victim)
            return worst, step
    return best


def _best_merge(s: State, m: int, on, best):
    """One replica fewer of a replicated expert on ``m`` (its other replicas carry more)."""
    for i in np.flatnonzero((s.reps[s.expert[on]] > 1) & ~s.pinned[s.expert[on]]).tolist():
        r = int(on[i])
        e = int(s.expert[r])
        rows = np.flatnonzero(s.expert == e)
        after = s.sl.copy()
        after[s.shard[rows]] += s.load[e] / (len(rows) - 1) - s.load[e] / len(rows)
        after[m] = s.sl[m] - s.w[r]
        touched = s.shard[rows]
        if after[touched].max() < best[0]:
            return after[touched].max(), _merge_step(r)
    return best


def _best_split_eject(s: State, m: int, on, held, best):
    """One more replica of an expert on ``m`` on a *full* shard, whose lightest replica
    moves to a shard with a free place: a split that a plain split cannot make."""
    if s.limit - len(s.expert) <= 0:
        return best
    full = np.flatnonzero(s.active & (s.count >= s.cap))
    roomy = np.flatnonzero(s.active & (s.count < s.cap))
    if not len(full) or not len(roomy):
        return best
    for i in np.argsort(-s.w[on], kind="stable")[:8].tolist():
        r = int(on[i])
        e = int(s.expert[r])
        if s.pinned[e] or s.reps[e] >= s.num_active:
            continue
        rows = np.flatnonzero(s.expert == e)
        share = s.load[e] / (len(rows) + 1)
        base = s.sl.copy()
        base[s.shard[rows]] += share - s.load[e] / len(rows)
        for n in full[~held[i, full]].tolist():
            mine = np.flatnonzero(s.shard == n)
            x = int(mine[np.argmin(s.w[mine])])
            if s.reps[s.expert[x]] > 1:
                continue
            t_ok = roomy[roomy != n]
            if not len(t_ok):
                continue
            t = int(t_ok[np.argmin(base[t_ok])])
            after = base.copy()
            after[n] += share - s.w[x]
            after[t] += s.w[x]
            touched = np.concatenate([s.shard[rows], [n, t]])
            if after[touched].max() < best[0]:
                return after[touched].max(), _eject_step(e, n, x, t)
    return best


def _split_loads(s: State, e: int, n: int, base: np.ndarray) -> np.ndarray:
    """Shard loads ``base`` after one more replica of ``e`` on shard ``n``."""
    rows = np.flatnonzero(s.expert == e)
    r = len(rows)
    sl = base.copy()
    sl[s.shard[rows]] += s.load[e] / (r + 1) - s.load[e] / r
    sl[n] += s.load[e] / (r + 1)
    return sl


def _merge_victim(s: State, keep_e: int):
    """The replicated expert whose lost replica costs least (None if there is none)."""
    multi = np.flatnonzero((s.reps > 1) & ~s.pinned)
    multi = multi[multi != keep_e]
    if not len(multi):
        return None
    return int(multi[np.argmin(s.load[multi] / s.reps[multi])])


def _merge_loads(s: State, e: int) -> tuple[np.ndarray, int]:
    """(shard loads after one replica fewer of ``e``, the shard that loses it): the replica
    on its most loaded holder goes."""
    rows = np.flatnonzero(s.expert == e)
    r = len(rows)
    drop = int(s.shard[rows[np.argmax(s.sl[s.shard[rows]])]])
    out = s.sl.copy()
    out[s.shard[rows]] += s.load[e] / (r - 1) - s.load[e] / r
    out[drop] -= s.load[e] / (r - 1)
    return out, drop


# --- applying steps (each returns the replicas it put at new places) --------------------


def _move(s: State, r: int, n: int) -> int:
    old = s.shard[r]
    s.sl[old] -= s.w[r]
    s.sl[n] += s.w[r]
    s.count[old] -= 1
    s.count[n] += 1
    s.shard[r] = n
    return 1


def _swap(s: State, a: int, b: int) -> int:
    sa, sb = s.shard[a], s.shard[b]
    s.sl[sa] += s.w[b] - s.w[a]
    s.sl[sb] += s.w[a] - s.w[b]
    s.shard[a], s.shard[b] = sb, sa
    return 2


def _split(s: State, e: int, n: int) -> int:
    s.expert = np.append(s.expert, e)
    s.shard = np.append(s.shard, n)
    if s.origin is not None:
        s.origin = np.append(s.origin, -1)
    _reweigh(s)
    return 1


def _split_step(e: int, n: int):
    return lambda st: _split(st, e, n)


def _split_merge(e: int, n: int, victim: int):
    def apply(s: State) -> int:
        rows = np.flatnonzero(s.expert == victim)
        drop = rows[np.argmax(s.sl[s.shard[rows]])]
        keep = np.ones(len(s.expert), bool)
        keep[drop] = False
        _keep(s, keep)
        return _split(s, e, n)

    return apply


def _merge_step(r: int):
    def apply(s: State) -> int:
        keep = np.ones(len(s.expert), bool)
        keep[r] = False
        _keep(s, keep)
        _reweigh(s)
        return 0

    return apply


def _eject_step(e: int, n: int, x: int, t: int):
    def apply(s: State) -> int:
        _move(s, x, t)
        return 1 + _split(s, e, n)

    return apply


def _keep(s: State, keep: np.ndarray) -> None:
    s.expert, s.shard = s.expert[keep], s.shard[keep]
    if s.origin is not None:
        s.origin = s.origin[keep]


def _reweigh(s: State) -> None:
    s.__post_init__()
