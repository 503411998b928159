"""Speculation-control policies: one interface (:mod:`.base`), one module per policy, a registry by name.

Registry names (:data:`POLICIES`, :func:`make_policy`):

- ``static`` — :class:`StaticPolicy`: a fixed k (and :func:`oracle_static`, the best fixed k offline);
- ``dsde`` — :class:`DSDEPolicy`: per-request k from KL(p‖q) stability, with the batch SL cap;
- ``tide-control`` — :class:`TideControlPolicy`: speculate iff TIDE's predicted speedup > 1 at this batch size;
- ``sglang-adaptive`` — :class:`SGLangAdaptivePolicy`: SGLang 0.5.23's EMA step slots per batch size;
- ``goodput`` — :class:`GoodputPolicy`: the k maximising expected tokens per batch second (SmartSpec);
- ``bandit`` — :class:`BanditPolicy`: UCB1 / Thompson sampling over speculation configurations;
- ``update-bandit`` — :class:`UpdateBandit`: skip / head-only / full drafter updates (role "drafter-update":
  ``choose_update`` / ``observe_update``, no ``decide``).

:class:`ComposedPolicy` combines a length policy, the DSDE batch cap and an on/off policy; :mod:`.config` saves
and loads any of them as JSON; :func:`tunables` lists what the simulator's tuner may search.
"""

from __future__ import annotations

from .bandit import BanditPolicy
from .base import BatchLengths, BatchView, Decision, Param, Policy, lengths_in_order
from .compose import ComposedPolicy, apply_batch_cap, batch_length
from .dsde import DSDEPolicy
from .goodput import GoodputPolicy
from .registry import LENGTH_POLICIES, POLICIES, make_policy, policy_class, tunables
from .sglang_adaptive import SGLangAdaptivePolicy
from .static import StaticPolicy, oracle_static
from .tide import TideControlPolicy
from .update_bandit import UpdateBandit, UpdateRoundStats, throughput_gain

__all__ = [
    "BanditPolicy", "BatchLengths", "BatchView", "ComposedPolicy", "DSDEPolicy", "Decision", "GoodputPolicy", "LENGTH_POLICIES",
    "POLICIES", "Param", "Policy", "SGLangAdaptivePolicy", "StaticPolicy", "TideControlPolicy", "UpdateBandit",
    "UpdateRoundStats", "apply_batch_cap", "batch_length", "lengths_in_order", "make_policy", "oracle_static", "policy_class", "throughput_gain",
    "tunables",
]
