"""Policy config files: one JSON format that the simulator's tuner writes and every host loads.

.. code-block:: json

    {"policy": "dsde", "params": {"variant": "code", "max_k": 8}, "state": {...}}

``params`` are the policy's declared :class:`~.base.Param` values (missing ones take their defaults);
``state`` (optional) is its learned :meth:`~.base.Policy.state_dict`; ``meta`` (optional) is free-form and
ignored (e.g. what the tuner measured). A composed policy nests whole configs::

    {"policy": "composed", "params": {"cap": true, "length": {"policy": "dsde", ...}, "onoff": {...} or null}}

Every error names the file and the offending key and value, e.g. ``policy.json: dsde.max_k=999 outside
[1, 32]``. Objects that are not config (a profile's cost model) are passed to :func:`load_policy_config` as
keywords and reach every (nested) policy whose class lists them in ``extra_args``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Policy
from .compose import ComposedPolicy
from .registry import POLICIES, policy_class, tunables

__all__ = ["load_policy_config", "policy_from_dict", "policy_to_dict", "save_policy_config", "tunables"]

_TOP_KEYS = {"policy", "params", "state", "meta"}


def policy_to_dict(policy: Policy, include_state: bool = True) -> dict:
    """The JSON-ready config of a policy (params, and learned state unless ``include_state`` is False)."""
    if isinstance(policy, ComposedPolicy):
        params = {"cap": policy.cap, "length": policy_to_dict(policy.length_policy, include_state),
                  "onoff": policy_to_dict(policy.onoff, include_state) if policy.onoff is not None else None}
        return {"policy": ComposedPolicy.name, "params": params}
    out: dict[str, Any] = {"policy": policy.name, "params": dict(policy.config)}
    if include_state:
        out["state"] = policy.state_dict()
    return out


def policy_from_dict(d: Any, where: str = "<config>", prefix: str = "", **extra: Any) -> Policy:
    """Build (and restore the state of) the policy a config dict describes; ValueError naming ``where`` and the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: {prefix or 'config'} is not an object {{\"policy\": ..., \"params\": {{...}}}}")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: {prefix}{unknown[0]} is not a config key; known: {sorted(_TOP_KEYS)}")
    if "policy" not in d:
        raise ValueError(f"{where}: {prefix}policy is missing (one of {sorted(POLICIES) + ['composed']})")
    name = d["policy"]
    params = d.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: {prefix}params={params!r} is not an object")
    if name == ComposedPolicy.name:
        return _composed_from_dict(params, where, prefix, extra)
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"{where}: {prefix}policy={name!r} is unknown; choose from {sorted(POLICIES) + ['composed']}")
    cls = policy_class(name)
    declared = {p.name: p for p in cls.params}
    checked = {}
    for key, value in params.items():
        if key not in declared:
            raise ValueError(f"{where}: {prefix}{name}.{key} is not a parameter; known: {sorted(declared)}")
        try:
            checked[key] = declared[key].check(value)
        except ValueError as e:
            raise ValueError(f"{where}: {prefix}{name}.{e}") from None
    kwargs = {k: v for k, v in extra.items() if k in cls.extra_args}
    try:
        policy = cls(**checked, **kwargs)
    except ValueError as e:
        msg = str(e)
        raise ValueError(f"{where}: {prefix}{msg if msg.startswith(name) else f'{name}.{msg}'}") from None
    state = d.get("state")
    if state:
        try:
            policy.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: {prefix}{name}.state does not fit the policy: {e!r}") from None
    return policy


def _composed_from_dict(params: dict, where: str, prefix: str, extra: dict) -> ComposedPolicy:
    p = f"{prefix}composed."
    unknown = sorted(set(params) - {"cap", "length", "onoff"})
    if unknown:
        raise ValueError(f"{where}: {p}{unknown[0]} is not a parameter; known: ['cap', 'length', 'onoff']")
    cap = params.get("cap", True)
    if not isinstance(cap, bool):
        raise ValueError(f"{where}: {p}cap={cap!r} is not true or false")
    if "length" not in params:
        raise ValueError(f"{where}: {p}length is missing (the per-request length policy's config)")
    length = policy_from_dict(params["length"], where, f"{p}length.", **extra)
    onoff = params.get("onoff")
    onoff = policy_from_dict(onoff, where, f"{p}onoff.", **extra) if onoff is not None else None
    return ComposedPolicy(length, cap=cap, onoff=onoff)


def save_policy_config(path: str | Path, policy: Policy, include_state: bool = True, meta: dict | None = None) -> None:
    """Write ``policy`` as JSON (params, state unless ``include_state`` is False, optional ``meta``)."""
    d = policy_to_dict(policy, include_state)
    if meta:
        d["meta"] = meta
    Path(path).write_text(json.dumps(d, indent=2, allow_nan=False) + "\n")


def read_policy_file(path: str | Path) -> dict:
    """A policy config file's JSON (not yet checked); errors name the file."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); a policy config is JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e}") from None


def load_policy_config(path: str | Path, **extra: Any) -> Policy:
    """The policy a config file describes (state restored when present); errors name the file and key."""
    return policy_from_dict(read_policy_file(path), str(path), **extra)
