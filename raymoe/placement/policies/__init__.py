"""Placement policies: pure functions ``(load [E], current placement, budget) -> Plan``,
chosen by name from :data:`POLICIES`. No Ray, no weights: a policy only decides where
replicas live (glossary in :mod:`raymoe.placement`)."""

from __future__ import annotations

from collections.abc import Callable

from raymoe.errors import ConfigError
from raymoe.placement.budget import Plan
from raymoe.placement.policies.balanced import balanced
from raymoe.placement.policies.eplb import eplb
from raymoe.placement.policies.incremental import incremental

Policy = Callable[..., Plan]

POLICIES: dict[str, Policy] = {"balanced": balanced, "incremental": incremental, "eplb": eplb}
DEFAULT_POLICY = "balanced"


def get_policy(name: str) -> Policy:
    """The policy called ``name``; an unknown name is a ConfigError listing the valid ones."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown policy {name!r}; valid: {sorted(POLICIES)}", "policy") from None
