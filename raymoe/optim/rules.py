"""Optimizer rules over expert rows: SGD, Adam and AdamW, applied lazily.

A *row* is one expert's slice of a bank parameter (``w_gate[e]``, ``u[e]``, ...). A step
updates only the rows touched since the last step (the experts that received a routed pair),
and each row keeps its own optimizer state, created when it is first touched: a million
experts cost state only for the ones that train. Each row counts its own steps, so Adam's
bias correction of an expert first touched at step 1,000 is that of its first step.

Every row-wise rule equals its ``torch.optim`` namesake on rows touched at every step
(``tests/unit/test_optim.py``); with ``weight_decay`` an untouched row does not decay, as
in ``torch.optim.SparseAdam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from raymoe.errors import ConfigError

Rows = dict[str, torch.Tensor]  # {bank name: [n, ...]}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer's hyper-parameters (plain values: sent with every step, so a schedule
    may change ``lr`` between steps)."""

    kind: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: float = 1e-8
    weight_decay: float = 0.0  # sgd, adam: L2 added to the gradient; adamw: decoupled

    def __post_init__(self):
        if self.kind not in RULES:
            raise ConfigError(f"unknown optimizer {self.kind!r}; valid: {sorted(RULES)}")
        b1, b2 = self.betas
        checks = {
            "lr": math.isfinite(self.lr) and self.lr >= 0,
            "momentum": 0 <= self.momentum < 1,
            "betas": 0 <= b1 < 1 and 0 <= b2 < 1,
            "eps": math.isfinite(self.eps) and self.eps > 0,
            "weight_decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"optimizer {self.kind}: invalid {', '.join(bad)} in {self}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-row state tensors the rule keeps beside each parameter row."""
        if self.kind == "sgd" and not self.momentum:
            return ()
        return RULES[self.kind][1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, value: OptimizerSpec | dict | str) -> OptimizerSpec:
        if isinstance(value, OptimizerSpec):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if not isinstance(value, dict):
            raise ConfigError(f"an optimizer is a kind, a dict or an OptimizerSpec; got {value!r}")
        try:
            return cls(**{**value, "betas": tuple(value.get("betas", (0.9, 0.999)))})
        except TypeError as e:
            raise ConfigError(f"optimizer: {e}") from None


@torch.no_grad()
def apply(
    spec: OptimizerSpec,
    params: Rows,
    grads: Rows,
    state: dict[str, Rows],
    steps: torch.Tensor,
) -> None:
    """Update ``params`` in place from ``grads`` (both ``{name: [n, ...]}``), with the rows'
    state (``{state name: {name: [n, ...]}}``, zeros for a row's first step, updated in
    place) and step counts ``steps`` ([n], before this step; incremented here)."""
    steps += 1
    rule = RULES[spec.kind][0]
    for name, p in params.items():
        rule(spec, p, grads[name], {k: v[name] for k, v in state.items()}, steps)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row value [n] broadcast against rows ``like`` [n, ...]."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _sgd(spec: OptimizerSpec, p, g, s, steps) -> None:
    if spec.weight_decay:
        g = g + spec.weight_decay * p
    if spec.momentum:
        buf = s["momentum"]
        first = _per_row(steps == 1, buf).bool()
        buf.copy_(torch.where(first, g, spec.momentum * buf + g))  # torch: buf = g at first
        g = buf
    p.add_(g, alpha=-spec.lr)


def _adam(spec: OptimizerSpec, p, g, s, steps, decoupled: bool = False) -> None:
    b1, b2 = spec.betas
    if spec.weight_decay and decoupled:
        p.mul_(1 - spec.lr * spec.weight_decay)
    elif spec.weight_decay:
        g = g + spec.weight_decay * p
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    t = steps.to(torch.float64)
    correction1 = _per_row(1 - b1**t, p)
    correction2_sqrt = _per_row((1 - b2**t).sqrt(), p)
    denom = (v.sqrt() / correction2_sqrt).add_(spec.eps)
    p.addcdiv_(m, denom * correction1, value=-spec.lr)


def _adamw(spec: OptimizerSpec, p, g, s, steps) -> None:
    _adam(spec, p, g, s, steps, decoupled=True)


Rule = Callable[..., None]
RULES: dict[str, tuple[Rule, tuple[str, ...]]] = {
    "sgd": (_sgd, ("momentum",)),
    "adam": (_adam, ("exp_avg", "exp_avg_sq")),
    "adamw": (_adamw, ("exp_avg", "exp_avg_sq")),
}
