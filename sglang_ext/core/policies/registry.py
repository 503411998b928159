"""Policies by name: the registry every host, the simulator's tuner and the config loader use."""

from __future__ import annotations

from typing import Any

from .bandit import BanditPolicy
from .base import Param, Policy
from .dsde import DSDEPolicy
from .goodput import GoodputPolicy
from .sglang_adaptive import SGLangAdaptivePolicy
from .static import StaticPolicy
from .tide import TideControlPolicy
from .update_bandit import UpdateBandit

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (StaticPolicy, DSDEPolicy, TideControlPolicy, SGLangAdaptivePolicy, GoodputPolicy, BanditPolicy,
                UpdateBandit)
}

#: the policies that decide draft lengths (what a host's --speculative-policy may name)
LENGTH_POLICIES: tuple[str, ...] = tuple(name for name, cls in POLICIES.items() if cls.role == "length")


def policy_class(name: str) -> type[Policy]:
    """The class registered under ``name`` (ValueError listing the known names otherwise)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None


def make_policy(name: str, **params: Any) -> Policy:
    """A policy by registry name; ``params`` are its declared parameters plus any of its ``extra_args``
    (e.g. ``cost_model=`` for tide-control and goodput). Unknown names and parameters raise ValueError."""
    return policy_class(name)(**params)


def tunables(name: str) -> list[Param]:
    """The parameters of a policy a tuner may search: numbers and choices, each with its default and bounds
    (free-form JSON parameters such as bandit arms are left out)."""
    return [p for p in policy_class(name).params if p.tunable]
