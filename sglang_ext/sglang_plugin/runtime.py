"""The extension's state in one SGLang scheduler process: the policy adapter, online learning and metrics.

One :class:`Runtime` per speculative worker (SGLang runs one scheduler per GPU; tensor parallelism > 1 is not
supported by the plugin yet and is refused). The hooks in :mod:`.hooks` call it; it calls the core.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from sglang_ext.flags import policy_from_spec

from .launch_flags import PluginConfig
from .metrics import PluginMetrics
from .steps import CorePolicySteps

log = logging.getLogger("sglang_ext.sglang_plugin")

#: seconds between status lines in the server log
LOG_EVERY_S = 30.0
#: seconds between updates of the /metrics gauges
METRICS_EVERY_S = 1.0


class Runtime:
    """Per-process singleton bound to the EAGLE worker it was started for."""

    instance: ClassVar[Runtime | None] = None

    def __init__(self, worker: Any, config: PluginConfig, server_args: Any = None) -> None:
        self.worker = worker
        self.config = config
        self.steps: CorePolicySteps | None = None
        self.online = None
        self.online_faults = 0
        self._last_log = time.monotonic()
        self._last_metrics = float("-inf")
        if config.policy is not None:
            controller = getattr(worker, "adaptive_controller", None)
            if controller is None:
                raise RuntimeError("sglang-ext: --speculative-policy needs SGLang's adaptive controller, which this "
                                   "worker did not build (is --speculative-adaptive off for this configuration?)")
            self.steps = CorePolicySteps(policy_from_spec(config.policy), config.max_steps, config.policy_log)
            controller.params = self.steps  # SGLang's AdaptiveSpecPolicy seam: every decision is the core's
            log.info("sglang-ext: policy %s decides 0..%d draft steps per batch", self.steps.policy.name,
                     config.max_steps)
        if config.online is not None:
            from .online import OnlineBridge

            self.online = OnlineBridge.start(worker, config, server_args)
        enable = bool(getattr(server_args, "enable_metrics", False)) if server_args is not None else False
        self.metrics = PluginMetrics.create() if enable else None

    # ---- lifetime ---------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, worker: Any, config: PluginConfig, server_args: Any = None) -> Runtime:
        if cls.instance is not None and cls.instance.worker is not worker:
            raise RuntimeError("sglang-ext: one speculative worker per process is supported (tp/dp size 1)")
        cls.instance = Runtime(worker, config, server_args)
        return cls.instance

    @classmethod
    def for_worker(cls, worker: Any) -> Runtime | None:
        rt = cls.instance
        return rt if rt is not None and rt.worker is worker else None

    # ---- per step ---------------------------------------------------------------------------------------------
    def before_step(self, batch: Any) -> None:
        """Between steps: deploy a new drafter if one is ready; tell the policy the decode batch's requests."""
        if self.online is not None:
            self._guard("online hand-off", self.online.between_steps)
        if self.steps is not None and not (batch.forward_mode.is_extend() or batch.is_extend_in_batch):
            reqs = batch.reqs
            self.steps.begin_batch([r.rid for r in reqs], [len(r.origin_input_ids) + len(r.output_ids) for r in reqs])
        self._report()

    def after_verify(self, batch: Any, verify_input: Any, result: Any) -> None:
        if self.online is not None:
            self._guard("online capture", self.online.capture, batch, verify_input, result)

    def finish(self, rid: str) -> None:
        if self.steps is not None:
            self.steps.finish(rid)
        if self.online is not None:
            self._guard("online finish", self.online.finish, rid)

    def _guard(self, what: str, fn, *args) -> None:
        """Online learning is best-effort: a fault in it is logged and counted, and serving goes on."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            self.online_faults += 1
            if self.online_faults <= 5 or self.online_faults % 100 == 0:
                log.exception("sglang-ext: %s failed (%d fault(s) so far); serving continues", what, self.online_faults)

    # ---- reporting ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        out: dict = {}
        if self.steps is not None:
            out["policy"] = self.steps.status()
        if self.online is not None:
            out["online"] = {**self.online.status(), "faults": self.online_faults}
        return out

    def _report(self) -> None:
        """Gauges at most once a second (status() lists the hand-off directory), a log line every 30 s."""
        now = time.monotonic()
        status = None
        if self.metrics is not None and now - self._last_metrics >= METRICS_EVERY_S:
            self._last_metrics = now
            status = self.status()
            self.metrics.update(status)
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.info("sglang-ext status: %s", status or self.status())


__all__ = ["Runtime"]
