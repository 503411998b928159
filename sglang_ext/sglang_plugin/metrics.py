"""The extension's decisions on SGLang's ``/metrics`` (``--enable-metrics``).

SGLang serves Prometheus metrics from several processes through ``prometheus_client``'s multiprocess mode (its
``PROMETHEUS_MULTIPROC_DIR`` is set before the scheduler starts), so gauges created in the scheduler with
``multiprocess_mode="mostrecent"`` appear on the HTTP server's ``/metrics`` beside SGLang's own ``sglang:*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: (name, documentation, path into Runtime.status())
GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("sglang_ext:spec_steps", "draft steps the policy chose for the latest decode batch (0: plain decoding)",
     ("policy", "last_steps")),
    ("sglang_ext:policy_decisions", "decode steps decided by the policy", ("policy", "decisions")),
    ("sglang_ext:policy_speculative_steps", "decode steps the policy speculated on", ("policy", "speculative_steps")),
    ("sglang_ext:policy_plain_steps", "decode steps the policy turned speculation off for", ("policy", "plain_steps")),
    ("sglang_ext:online_rounds", "online training rounds finished", ("online", "rounds")),
    ("sglang_ext:online_deployed", "online rounds whose drafter was deployed", ("online", "deployed")),
    ("sglang_ext:online_drafter_version", "drafter version serving (1: the launch drafter)", ("online", "serving_version")),
    ("sglang_ext:online_buffer_bytes", "bytes held by the capture buffer", ("online", "capture_bytes_used")),
    ("sglang_ext:online_collecting", "1 while selective training collects samples", ("online", "collecting")),
    ("sglang_ext:online_trainer_restarts", "trainer process restarts", ("online", "restarts")),
)


def _read(status: dict, path: tuple[str, ...]) -> float | None:
    node: Any = status
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool):
        return float(node)
    return float(node) if isinstance(node, (int, float)) else None


@dataclass
class PluginMetrics:
    gauges: dict

    @staticmethod
    def create() -> PluginMetrics:
        from prometheus_client import Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        return PluginMetrics({name: (Gauge(name, doc, multiprocess_mode="mostrecent"), path)
                              for name, doc, path in GAUGES})

    def update(self, status: dict) -> None:
        for gauge, path in self.gauges.values():
            value = _read(status, path)
            if value is not None:
                gauge.set(value)


__all__ = ["GAUGES", "PluginMetrics"]
