"""The data formats that cross between the engine, the SGLang plugin and the simulator, in one neutral home: the
engine writes them, the simulator reads them, and neither imports the other for them.

| module | format | what |
|---|---|---|
| :mod:`.trace` | ``sglang-ext`` trace JSONL (header ``{"trace": {...}}``, then one request per line; version: the header's keys) | ``arrival`` (s, non-decreasing), ``prompt_tokens``, ``output_tokens``, optional ``category``, ``acceptance`` (accepted drafts per verify step), ``id``; readers name ``file:line`` |
| :mod:`.results` | ``sglang-ext.sim-result`` JSON (``version`` 1) and ``requests.csv`` | per-request columns (``REQUEST_COLUMNS``: times in s, token counts) plus TTFT/TPOT/E2E; the summary (throughput, goodput, latency percentiles, time shares, rejected requests, lookups beyond the cost profile) |
| :mod:`.steps` | per-step records | accepted counts and per-position KL, mapped onto output positions for replay |

The cost-profile format (``sglang-ext-profile/1``) lives with its fitter in :mod:`sglang_ext.core.costs`.
"""
