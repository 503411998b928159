"""The extension's flags on SGLang's own command line, and how their values reach the spawned scheduler.

SGLang has no API for plugin flags (``sglang-cpu-serving.md``, "Plugin seams"): an AFTER hook on the static
``ServerArgs.add_cli_args(parser)`` adds an "sglang-ext" argument group (so ``--help`` lists it), and an AROUND
hook on ``prepare_server_args(argv)`` reads our flags from ``argv``, checks them (a bad value exits with status 2
and a message naming the flag, before anything loads), rewrites the speculative flags a policy needs, and hands
the result on as :class:`PluginConfig`: as ``server_args._sglang_ext`` (bookkeeping attributes survive pickling to
spawned processes) and as the environment variable :data:`ENV` (inherited by every child process).

A policy runs through SGLang's adaptive seam, which exists only for EAGLE/EAGLE3 with ``--speculative-eagle-topk
1``; the rewrite adds ``--speculative-adaptive`` and an adaptive config whose one slot lists every length
``0..--speculative-num-steps``, so SGLang builds a runtime state for each length the policy may pick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sglang_ext.flags import FlagError, add_online_args, add_policy_args, online_config_from_args, policy_spec_from_args

ENV = "SGLANG_EXT_PLUGIN_CONFIG"
GROUP_TITLE = "sglang-ext (adaptive speculative decoding; see sglang-ext's README)"
#: draft steps when a policy is given without --speculative-num-steps (SGLang's EAGLE default chain is 3 steps)
DEFAULT_MAX_STEPS = 3
POLICY_ALGORITHMS = ("EAGLE", "EAGLE3")


@dataclass
class PluginConfig:
    """What the extension does in a server: JSON-able, so it crosses process boundaries intact."""

    policy: dict | None = None  # {"policy": NAME, "params": {...}} (sglang_ext.core.policies.config)
    max_steps: int = 0
    policy_log: str | None = None
    online: dict | None = None  # the --online-* values given (None: no online learning)
    online_handoff_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.policy is not None or self.online is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> PluginConfig:
        return PluginConfig(**json.loads(text))


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The "sglang-ext" argument group (also what ``sglang-ext serve`` accepts, from :mod:`sglang_ext.flags`)."""
    g = parser.add_argument_group(GROUP_TITLE)
    add_policy_args(g)
    g.add_argument("--speculative-policy-log", metavar="FILE",
                   help="append every decision (batch request ids, chosen steps, accept counts, seconds) to this "
                        "JSONL file; sglang_ext.sglang_plugin.steps.replay_decisions re-runs the core policy on it")
    add_online_args(g)


def _speculative_view(argv: list[str]) -> argparse.Namespace:
    """SGLang's own speculative flags as given on the command line (None where absent)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--speculative-algorithm")
    p.add_argument("--speculative-num-steps", type=int)
    p.add_argument("--speculative-eagle-topk", type=int)
    p.add_argument("--speculative-num-draft-tokens", type=int)
    p.add_argument("--speculative-draft-model-path", "--speculative-draft-model", dest="speculative_draft_model_path")
    p.add_argument("--speculative-adaptive", action="store_true")
    p.add_argument("--speculative-adaptive-config")
    ns, _ = p.parse_known_args(argv)
    return ns


def _ext_view(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    add_cli_args(p)
    ns, _ = p.parse_known_args(argv)
    return ns


def adaptive_config_file(max_steps: int) -> str:
    """A ``--speculative-adaptive-config`` file with one slot listing lengths 0..max_steps (content-addressed)."""
    body = json.dumps({"1": {"candidate_steps": list(range(0, max_steps + 1))}}, sort_keys=True)
    path = Path(tempfile.gettempdir()) / f"sglang-ext-adaptive-{hashlib.sha1(body.encode()).hexdigest()[:12]}.json"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return str(path)


def resolve(ext: argparse.Namespace, spec: argparse.Namespace) -> tuple[PluginConfig, list[str]]:
    """``(config, extra SGLang argv)`` from our flags and SGLang's speculative ones; FlagError names the flag."""
    policy = policy_spec_from_args(ext)
    online = online_config_from_args(ext)
    if getattr(ext, "speculative_policy_log", None) and policy is None:
        raise FlagError("--speculative-policy-log needs --speculative-policy or --speculative-policy-config")
    config = PluginConfig(policy=policy, policy_log=getattr(ext, "speculative_policy_log", None), online=online,
                          online_handoff_dir=getattr(ext, "online_handoff_dir", None))
    extra: list[str] = []
    algo = (spec.speculative_algorithm or "").upper()
    if online is not None and algo not in POLICY_ALGORITHMS:
        raise FlagError(f"--online-learning needs --speculative-algorithm EAGLE3 with a drafter exported by "
                        f"`sglang-ext export-drafter` (got {spec.speculative_algorithm or 'none'})")
    if policy is None:
        return config, extra
    flag = "--speculative-policy" if ext.speculative_policy else "--speculative-policy-config"
    if algo not in POLICY_ALGORITHMS:
        raise FlagError(f"{flag}: SGLang's adaptive-speculation seam runs EAGLE/EAGLE3 only "
                        f"(got --speculative-algorithm {spec.speculative_algorithm or 'none'})")
    if spec.speculative_eagle_topk not in (None, 1):
        raise FlagError(f"{flag}: SGLang's adaptive seam needs --speculative-eagle-topk 1 (chains), "
                        f"got {spec.speculative_eagle_topk}")
    if spec.speculative_adaptive or spec.speculative_adaptive_config:
        raise FlagError(f"{flag}: replaces SGLang's own --speculative-adaptive rule; drop --speculative-adaptive"
                        f"{'-config' if spec.speculative_adaptive_config else ''} (use --speculative-policy "
                        f"sglang-adaptive for SGLang's rule run by the core)")
    steps = spec.speculative_num_steps
    if steps is None:
        steps = DEFAULT_MAX_STEPS
        extra += ["--speculative-num-steps", str(steps)]
    if steps < 1:
        raise FlagError(f"--speculative-num-steps {steps}: a policy needs at least 1 (it picks 0..num-steps)")
    if spec.speculative_num_draft_tokens not in (None, steps + 1):
        raise FlagError(f"--speculative-num-draft-tokens {spec.speculative_num_draft_tokens}: a chain of "
                        f"{steps} steps verifies {steps + 1} tokens")
    if spec.speculative_eagle_topk is None:
        extra += ["--speculative-eagle-topk", "1"]
    config.max_steps = steps
    extra += ["--speculative-adaptive", "--speculative-adaptive-config", adaptive_config_file(steps)]
    return config, extra


def publish(config: PluginConfig, server_args: Any = None) -> None:
    """Make ``config`` visible to this process and every process it spawns from now on."""
    os.environ[ENV] = config.to_json()
    if server_args is not None:
        try:
            server_args._sglang_ext = json.loads(config.to_json())
        except (AttributeError, TypeError):
            pass


def current(server_args: Any = None) -> PluginConfig:
    """The config of this server process (from ``server_args._sglang_ext``, else :data:`ENV`; empty if neither)."""
    stashed = getattr(server_args, "_sglang_ext", None) if server_args is not None else None
    if isinstance(stashed, dict):
        return PluginConfig(**stashed)
    text = os.environ.get(ENV)
    return PluginConfig.from_json(text) if text else PluginConfig()


def prepare_argv(argv: list[str], prog: str = "sglang serve") -> tuple[list[str], PluginConfig]:
    """Check our flags in ``argv`` and return SGLang's argv with the rewrite; exit 2 naming the flag if bad."""
    try:
        config, extra = resolve(_ext_view(argv), _speculative_view(argv))
    except FlagError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return list(argv) + extra, config


def engine_kwargs_to_argv(kwargs: dict) -> list[str]:
    """Pop the extension's keywords from ``kwargs`` (in place) and spell them as command-line flags.

    The keywords are the flags' names with underscores (``speculative_policy``, ``online_learning``, ...);
    ``speculative_policy_param`` may be a dict, a list of ``"K=V"`` strings or one string."""
    ext_dests = {a.dest: a for a in _parser_actions()}
    argv: list[str] = []
    for dest in list(kwargs):
        action = ext_dests.get(dest)
        if action is None:
            continue
        value = kwargs.pop(dest)
        opt = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(opt)
        elif isinstance(action, argparse._AppendAction):
            values = value if isinstance(value, (list, tuple)) else [value]
            if isinstance(value, dict):
                values = [f"{k}={json.dumps(v)}" for k, v in value.items()]
            for v in values:
                argv += [opt, str(v)]
        elif value is not None:
            argv += [opt, str(value)]
    return argv


def _parser_actions() -> list[argparse.Action]:
    p = argparse.ArgumentParser(add_help=False)
    add_cli_args(p)
    return [a for a in p._actions if a.option_strings]


__all__ = ["ENV", "GROUP_TITLE", "PluginConfig", "add_cli_args", "current", "engine_kwargs_to_argv", "prepare_argv",
           "publish", "resolve"]
