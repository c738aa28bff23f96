"""The ``routing`` section: one model per routing kind (DESIGN §3), each declaring what it can
do, so that nothing elsewhere asks "which kind is this?".

Capabilities every kind answers:

- :meth:`~_Routing.slots`: columns of the ``[T, S]`` routes it produces (an upper bound);
- :meth:`~_Routing.rows_per_token`: rows it sends the experts per token (an upper bound: 1,
  but soft routing's slots);
- :meth:`~_Routing.check`: whether it can route ``E`` experts (raises :class:`SpecProblem`);
- ``removable``: whether experts can be removed at runtime (its gate masks them out);
- :meth:`~_Routing.min_live`: the live experts it needs; :meth:`~_Routing.check_removed`:
  whether it can still route with experts ``removed`` (raises :class:`SpecProblem`);
- :meth:`~_Routing.grown`: the routing section of a pool grown by ``count`` experts, or a
  :class:`~raymoe.errors.ConfigError` saying why it cannot grow (``growable`` kinds can);
- :meth:`~_Routing.align`: the unit placement keeps together (product-key pools: one row);
- :meth:`~_Routing.gate_rows`: the gate rows (by neutral name, shape) new experts bring.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from raymoe.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpecProblem(ValueError):
    """An impossible combination, raised inside validation with the field it concerns."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def need(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise SpecProblem(f"routing.{field}", message)


class _Routing(_Section):
    aux_loss_coef: float = Field(0.0, ge=0.0)
    z_loss_coef: float = Field(0.0, ge=0.0)

    removable: ClassVar[bool] = False
    growable: ClassVar[bool] = False

    def slots(self, num_experts: int) -> int:
        return 1

    def rows_per_token(self, num_experts: int) -> int:
        return 1

    def check(self, num_experts: int) -> None:
        """Raise :class:`SpecProblem` unless this routing can route ``num_experts``."""

    def min_live(self) -> int:
        return 1

    def check_removed(self, num_experts: int, removed: tuple[int, ...]) -> None:
        """Raise :class:`SpecProblem` unless this routing can route without ``removed``."""

    def align(self, num_experts: int) -> int:
        return 1

    def grown(self, num_experts: int, count: int) -> _Routing:
        kinds = ", ".join(sorted(k for k, c in ROUTING_KINDS.items() if c.growable))
        raise ConfigError(
            f"{self.kind} routing cannot add experts at runtime; routing kinds that can: {kinds}",
            "routing",
        )

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        return {"router.weight": (count, d_model)}


class TopKRouting(_Routing):
    """Softmax/sigmoid top-k gating (Mixtral, Qwen, OLMoE, DeepSeek-V3, Shazeer's noisy top-k).
    Grows by any count and removes experts; with groups it grows by whole groups (the new
    experts form new groups, so groups stay equal), and a group's score counts its live
    experts only."""

    kind: Literal["topk"] = "topk"
    k: PositiveInt
    score: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    bias: bool = False
    correction_bias: bool = False
    noise: bool = False
    n_groups: PositiveInt | None = None
    topk_groups: PositiveInt | None = None
    group_score: Literal["max", "top2_sum"] = "top2_sum"

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def slots(self, num_experts: int) -> int:
        return self.k

    def min_live(self) -> int:
        return self.k

    def check(self, num_experts: int) -> None:
        E = num_experts
        need(self.k <= E, "k", f"k={self.k} exceeds experts.num_experts={E}")
        need(
            (self.n_groups is None) == (self.topk_groups is None),
            "n_groups",
            "n_groups and topk_groups must be given together",
        )
        if self.n_groups is None:
            return
        need(E % self.n_groups == 0, "n_groups", f"n_groups={self.n_groups} does not divide {E}")
        need(self.topk_groups <= self.n_groups, "topk_groups", "topk_groups exceeds n_groups")
        per_group = E // self.n_groups
        need(
            self.topk_groups * per_group >= self.k,
            "topk_groups",
            f"{self.topk_groups} groups of {per_group} experts leave fewer than k={self.k} experts",
        )
        need(
            self.group_score != "top2_sum" or per_group >= 2,
            "group_score",
            "top2_sum needs >= 2 experts per group",
        )

    def grown(self, num_experts: int, count: int) -> TopKRouting:
        if self.n_groups is None:
            return self
        return self.model_copy(update={"n_groups": _whole_groups(self, num_experts, count)})

    def check_removed(self, num_experts: int, removed: tuple[int, ...]) -> None:
        if self.n_groups is not None:
            _check_group_choice(num_experts, self.n_groups, removed, self.topk_groups, self.k)

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        out = {"router.weight": (count, d_model)}
        if self.bias:
            out["router.bias"] = (count,)
        if self.noise:
            out["router.noise.weight"] = (count, d_model)
        if self.correction_bias:
            out["router.correction_bias"] = (count,)
        return out


class SwitchRouting(_Routing):
    """Top-1 with capacity; a token over capacity is dropped and gets zero from the layer.
    Grows by any count and removes experts: a removed expert is as if its gate row were
    deleted, and ``capacity_factor`` counts the live experts."""

    kind: Literal["switch"] = "switch"
    capacity_factor: PositiveFloat | None = None  # 1.0 when neither this nor capacity is set
    capacity: PositiveInt | None = None
    capacity_scope: Literal["batch", "sequence"] = "batch"

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def grown(self, num_experts: int, count: int) -> SwitchRouting:
        return self

    def check(self, num_experts: int) -> None:
        need(
            self.capacity is None or self.capacity_factor is None,
            "capacity",
            "give capacity or capacity_factor, not both",
        )


class ExpertChoiceRouting(_Routing):
    """Each expert takes its top-c tokens, c = ceil(capacity_factor * T * k / E). Grows by
    any count and removes experts: removed experts take no tokens, and ``E`` counts the live
    ones."""

    kind: Literal["expert_choice"] = "expert_choice"
    k: PositiveInt = 1
    capacity_factor: PositiveFloat = 1.0

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def min_live(self) -> int:
        return self.k

    def grown(self, num_experts: int, count: int) -> ExpertChoiceRouting:
        return self

    def slots(self, num_experts: int) -> int:
        return num_experts

    def check(self, num_experts: int) -> None:
        need(self.k <= num_experts, "k", f"k={self.k} exceeds experts.num_experts={num_experts}")


class HashRouting(_Routing):
    """A fixed, balanced random hash of token id to one expert (Roller et al. 2021).

    Grows by any count with the fewest tokens moved: each new expert takes its balanced share
    of tokens from the experts holding the most (``grown_from``: the expert counts before
    each growth, so the table is a function of the spec). A removed expert's tokens are
    dealt to the live experts holding the fewest."""

    kind: Literal["hash"] = "hash"
    vocab_size: PositiveInt
    seed: int = 0
    grown_from: tuple[PositiveInt, ...] = ()

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def check(self, num_experts: int) -> None:
        steps = (*self.grown_from, num_experts)
        need(
            all(a < b for a, b in itertools.pairwise(steps)),
            "grown_from",
            f"expert counts before each growth must increase up to {num_experts}",
        )

    def grown(self, num_experts: int, count: int) -> HashRouting:
        return self.model_copy(update={"grown_from": (*self.grown_from, num_experts)})

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        return {}  # no weights: the table follows from the spec


class ProductKeyRouting(_Routing):
    """Multi-head product-key retrieval over rows x columns sub-keys (PEER, Lample 2019):
    expert ``i * columns + j`` pairs row key ``i`` with column key ``j``. ``columns`` defaults
    to sqrt(N) (a square grid); a pool grows by whole rows of ``columns`` experts."""

    kind: Literal["product_key"] = "product_key"
    heads: PositiveInt = 8
    k: PositiveInt = 16
    d_key: PositiveInt = 128
    query_batchnorm: bool = False
    columns: PositiveInt | None = None

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def grid(self, num_experts: int) -> tuple[int, int]:
        """(rows, columns) of the sub-key grid for ``num_experts``."""
        cols = self.columns or math.isqrt(num_experts)
        return num_experts // cols, cols

    def slots(self, num_experts: int) -> int:
        return self.heads * self.k

    def align(self, num_experts: int) -> int:
        return self.grid(num_experts)[1]

    def check(self, num_experts: int) -> None:
        E = num_experts
        if self.columns is None:
            root = math.isqrt(E)
            need(root * root == E, "kind", f"product_key needs a square expert count, got {E}")
        else:
            need(
                E % self.columns == 0,
                "columns",
                f"{E} experts are not whole rows of {self.columns} columns",
            )
        rows, cols = self.grid(E)
        need(
            self.k <= min(rows, cols),
            "k",
            f"k={self.k} exceeds the {min(rows, cols)} sub-keys of the smaller half",
        )
        need(self.d_key % 2 == 0, "d_key", f"d_key={self.d_key} must be even")

    def grown(self, num_experts: int, count: int) -> ProductKeyRouting:
        cols = self.grid(num_experts)[1]
        if count % cols:
            raise ConfigError(
                f"a product_key pool grows by whole sub-key rows of {cols} "
                f"experts; {count} is not a multiple of {cols}",
                "count",
            )
        return self.model_copy(update={"columns": cols})

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        return {"router.keys": (self.heads, count // self.align(num_experts), self.d_key // 2)}


class HierarchicalRouting(_Routing):
    """Two-level gating: softmax over groups, top ``k_groups``; softmax inside, top ``k``.
    Grows by whole branches (the new experts form new groups, each with a new group-gate
    row); a removed expert leaves its group's softmax, and a group left without live
    experts leaves the group softmax."""

    kind: Literal["hierarchical"] = "hierarchical"
    n_groups: PositiveInt
    k_groups: PositiveInt = 1
    k: PositiveInt = 1

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def grown(self, num_experts: int, count: int) -> HierarchicalRouting:
        return self.model_copy(update={"n_groups": _whole_groups(self, num_experts, count)})

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        m = num_experts // self.n_groups  # of the grown pool: its groups' size
        return {"router.weight": (count, d_model), "router.group.weight": (count // m, d_model)}

    def check_removed(self, num_experts: int, removed: tuple[int, ...]) -> None:
        _check_group_choice(num_experts, self.n_groups, removed, self.k_groups, self.k, True)

    def slots(self, num_experts: int) -> int:
        return self.k_groups * self.k

    def check(self, num_experts: int) -> None:
        E = num_experts
        need(E % self.n_groups == 0, "n_groups", f"n_groups={self.n_groups} does not divide {E}")
        need(self.k_groups <= self.n_groups, "k_groups", "k_groups exceeds n_groups")
        need(
            self.k <= E // self.n_groups,
            "k",
            f"k={self.k} exceeds the {E // self.n_groups} experts per group",
        )


def _whole_groups(r, num_experts: int, count: int) -> int:
    """The group count after growing by ``count`` experts: whole new groups only."""
    m = num_experts // r.n_groups
    if count % m:
        raise ConfigError(
            f"{r.kind} routing with groups grows by whole groups of {m} experts; "
            f"{count} is not a multiple of {m}",
            "count",
        )
    return r.n_groups + count // m


def _check_group_choice(E, n_groups, removed, pick, k, per_group=False) -> None:
    """Routing that keeps ``pick`` groups, then k experts (in all, or ``per_group``) must
    still find them among the live experts."""
    m = E // n_groups
    live = [m] * n_groups
    for e in removed:
        live[e // m] -= 1
    usable = sorted(n for n in live if n > 0)
    if len(usable) < pick:
        raise SpecProblem("experts.removed", f"fewer than {pick} groups keep live experts")
    if per_group and usable[0] < k:
        raise SpecProblem("experts.removed", f"a group keeps fewer than k={k} live experts")
    if not per_group and sum(usable[:pick]) < k:
        raise SpecProblem(
            "experts.removed", f"{pick} groups may hold fewer than k={k} live experts"
        )


class DenseRouting(_Routing):
    """Every expert, softmax-weighted (the original mixture of experts). Grows by any count
    and removes experts (the softmax runs over the live ones)."""

    kind: Literal["dense"] = "dense"

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def grown(self, num_experts: int, count: int) -> DenseRouting:
        return self

    def slots(self, num_experts: int) -> int:
        return num_experts


class SoftRouting(_Routing):
    """Soft MoE (Puigcerver et al. 2023): per sequence, each expert processes
    ``slots_per_expert`` slots, each a softmax-weighted average of the sequence's tokens, and
    each token's output is a softmax-weighted mix of every slot's output; dispatch and combine
    weights come from one logits matrix. Input ``[B, L, d]``; no client routes. Grows by any
    count (the new experts bring their slots) and removes experts (their slots go)."""

    kind: Literal["soft"] = "soft"
    slots_per_expert: PositiveInt = 1

    removable: ClassVar[bool] = True
    growable: ClassVar[bool] = True

    def grown(self, num_experts: int, count: int) -> SoftRouting:
        return self

    def rows_per_token(self, num_experts: int) -> int:
        return num_experts * self.slots_per_expert  # a sequence of one token: all its slots

    def gate_rows(self, d_model: int, num_experts: int, count: int) -> dict[str, tuple]:
        return {"router.weight": (count * self.slots_per_expert, d_model)}


ROUTING_KINDS: dict[str, type[_Routing]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        TopKRouting,
        SwitchRouting,
        ExpertChoiceRouting,
        HashRouting,
        ProductKeyRouting,
        HierarchicalRouting,
        DenseRouting,
        SoftRouting,
    )
}

RoutingSpec = Annotated[
    TopKRouting
    | SwitchRouting
    | ExpertChoiceRouting
    | HashRouting
    | ProductKeyRouting
    | HierarchicalRouting
    | DenseRouting
    | SoftRouting,
    Field(discriminator="kind"),
]
