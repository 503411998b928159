"""The extension's own launch flags, defined once for every host that serves: our reference server and SGLang.

``--speculative-policy NAME``, ``--speculative-policy-param K=V`` (repeatable), ``--speculative-policy-config FILE``
(the file ``sglang-ext sim tune`` writes) and ``--online-learning`` with one ``--online-<param>`` per tunable of
:data:`sglang_ext.online.ONLINE_PARAMS`. ``sglang-ext serve`` adds them to its parser; the SGLang plugin adds the
same flags to ``python -m sglang.launch_server`` (an "sglang-ext" argument group), so one launch line means the
same thing on both.

Every error is a :class:`FlagError` whose message starts with the flag (or the config file) that caused it, and
every check runs before anything loads, so a typo costs milliseconds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


class FlagError(ValueError):
    """A flag value the extension cannot start with; the message names the flag."""


def add_policy_args(group: argparse._ActionsContainer) -> None:
    """``--speculative-policy``, ``--speculative-policy-config``, ``--speculative-policy-param`` on ``group``."""
    group.add_argument("--speculative-policy", metavar="NAME",
                       help="speculation-control policy deciding each step's draft length (at most "
                            "--speculative-num-steps) and whether to speculate at all: static, dsde, tide-control, "
                            "sglang-adaptive, goodput, bandit (sglang_ext.core.policies). Default: none (always "
                            "num-steps)")
    group.add_argument("--speculative-policy-config", metavar="FILE",
                       help="a policy config JSON (written by `sglang-ext sim tune` or by hand: {\"policy\": NAME, "
                            "\"params\": {...}}); --speculative-policy-param values override its params")
    group.add_argument("--speculative-policy-param", action="append", default=[], metavar="NAME=VALUE",
                       help="set one policy parameter (repeatable), e.g. --speculative-policy-param max_k=4")


def add_online_args(group: argparse._ActionsContainer) -> None:
    """``--online-learning``, ``--online-handoff-dir`` and one ``--online-<param>`` per online tunable."""
    from sglang_ext.online import ONLINE_PARAMS

    group.add_argument("--online-learning", action="store_true",
                       help="train the drafter from live traffic in a trainer process (captured target hidden "
                            "states of committed tokens) and hot-swap it when the deploy gate says it is better")
    group.add_argument("--online-handoff-dir", metavar="DIR",
                       help="where versioned drafter checkpoints are published (default: a temporary directory)")
    for p in ONLINE_PARAMS:
        kind = {"int": int, "float": float}.get(p.kind, str)
        extra = {"choices": list(p.choices)} if p.kind == "choice" else {}
        group.add_argument("--online-" + p.name.replace("_", "-"), dest="online_" + p.name, type=kind, default=None,
                           help=p.flag_help, **extra)


def parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as JSON where it parses (numbers, true/false, lists), else a bare string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise FlagError(f"--speculative-policy-param {text!r}: expected NAME=VALUE")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value  # a bare string (a choice such as variant=paper)


def policy_spec_from_args(args: argparse.Namespace) -> dict | None:
    """The policy the flags ask for as a JSON-able config ``{"policy": NAME, "params": {...}}`` (None: no policy).

    The config file is read and every parameter checked here, by building the policy once, so a bad value fails
    at launch with the flag's name. The returned dict is what crosses process boundaries (a spawned scheduler
    rebuilds the policy from it with :func:`policy_from_spec`).
    """
    from sglang_ext.core.policies import LENGTH_POLICIES, make_policy
    from sglang_ext.core.policies.config import policy_from_dict, policy_to_dict, read_policy_file

    name = getattr(args, "speculative_policy", None)
    path = getattr(args, "speculative_policy_config", None)
    overrides = dict(parse_param(t) for t in getattr(args, "speculative_policy_param", None) or [])
    if not (name or path):
        if overrides:
            raise FlagError("--speculative-policy-param needs --speculative-policy or --speculative-policy-config")
        return None
    try:
        if path:
            file_dict = read_policy_file(path)  # read once: the policy and its deployment meta come from it
            policy = policy_from_dict(file_dict, str(path))
            if name and name != policy.name:
                raise FlagError(f"--speculative-policy {name} disagrees with {path} (policy {policy.name!r})")
            file_params = dict(policy.config)
            check_deployment(policy, path, file_dict, overrides, args)
            if overrides:
                policy = make_policy(policy.name, **{**policy.config, **overrides})
                check_order(policy, file_params, overrides, path)
        else:
            if name not in LENGTH_POLICIES:
                raise FlagError(f"--speculative-policy {name!r}: unknown; choose from "
                                f"{', '.join(sorted(LENGTH_POLICIES))}")
            policy = make_policy(name, **overrides)
            check_deployment(policy, None, None, overrides, args)
            check_order(policy, {}, overrides, None)
    except FlagError:
        raise
    except (OSError, ValueError) as e:
        flag = "--speculative-policy-config" if path else "--speculative-policy-param"
        raise FlagError(f"{flag}: {e}") from e
    return policy_to_dict(policy, include_state=bool(path))


DEPLOY_FLAGS = (("speculative_num_steps", "--speculative-num-steps"), ("speculative_eagle_topk", "--speculative-eagle-topk"),
                ("max_running_requests", "--max-running-requests"))


def check_deployment(policy, path: str | None, file_dict: dict | None, overrides: dict, args) -> None:
    """The policy's settings must fit the server they launch on: a config tuned for other serving flags (its
    ``meta.deploy``) is refused naming both values, and so is an explicit depth parameter (a tuned config's, or a
    ``--speculative-policy-param``) beyond ``--speculative-num-steps``. Defaults beyond it are fine: the server caps
    lengths there."""
    meta = (file_dict or {}).get("meta") or {}
    for key, flag in DEPLOY_FLAGS:
        want, have = (meta.get("deploy") or {}).get(key), getattr(args, key, None)
        if want is not None and have is not None and want != have:
            raise FlagError(f"--speculative-policy-config {path} was tuned for {flag} {want}, but this launch has "
                            f"{flag} {have}: tune again with the serving flags, or launch with {flag} {want}")
    steps = getattr(args, "speculative_num_steps", None)
    if steps is None:
        return
    tuned = bool(meta)  # a config written by the tuner carries its meta; every one of its values was chosen
    for p in type(policy).params:
        if not p.depth:
            continue
        if p.name in overrides:
            v, source = overrides[p.name], f"--speculative-policy-param {p.name}"
        elif tuned and p.name in policy.config:
            v, source = policy.config[p.name], f"--speculative-policy-config {path}: {p.name}"
        else:
            continue
        if v is not None and v > steps:
            raise FlagError(f"{source}={v} exceeds --speculative-num-steps {steps} (the deepest draft this server runs)")


def check_order(policy, file_params: dict, overrides: dict, path: str | None) -> None:
    """An override must not contradict the other depth parameters (DSDE: min_k <= init_k <= max_k): say which two."""
    merged = {**file_params, **overrides}
    for group in type(policy).ordered_params:
        vals = [(n, merged.get(n)) for n in group if merged.get(n) is not None]
        for (a, va), (b, vb) in zip(vals, vals[1:]):
            if va > vb and (a in overrides or b in overrides):
                where = lambda n: "--speculative-policy-param" if n in overrides else (path or "the defaults")  # noqa: E731
                raise FlagError(f"{where(a)} {a}={va} contradicts {where(b)} {b}={vb} ({a} must be <= {b})")


def policy_from_spec(spec: dict, **extra: Any):
    """Rebuild the policy of :func:`policy_spec_from_args` (``extra``: objects such as ``cost_model=``)."""
    from sglang_ext.core.policies.config import policy_from_dict

    return policy_from_dict(spec, **extra)


def policy_from_args(args: argparse.Namespace):
    """The policy named by the policy flags (None when none is asked for); errors are :class:`FlagError`."""
    spec = policy_spec_from_args(args)
    return None if spec is None else policy_from_spec(spec)


def online_config_from_args(args: argparse.Namespace) -> dict | None:
    """The ``--online-*`` values given (checked against their bounds), or None without ``--online-learning``."""
    from sglang_ext.online import ONLINE_PARAMS

    given = {p.name: getattr(args, "online_" + p.name) for p in ONLINE_PARAMS
             if getattr(args, "online_" + p.name, None) is not None}
    if not getattr(args, "online_learning", False):
        if given or getattr(args, "online_handoff_dir", None):
            names = ", ".join("--online-" + k.replace("_", "-") for k in sorted(given)) or "--online-handoff-dir"
            raise FlagError(f"{names}: needs --online-learning")
        return None
    for p in ONLINE_PARAMS:
        if p.name in given:
            try:
                given[p.name] = p.check(given[p.name])
            except ValueError as e:
                raise FlagError(f"--online-{p.name.replace('_', '-')}: {e}") from e
    return given


__all__ = ["FlagError", "add_online_args", "add_policy_args", "online_config_from_args", "parse_param",
           "policy_from_args", "policy_from_spec", "policy_spec_from_args"]
