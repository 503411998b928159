"""SGLang 0.5.23 seams this project builds on: fails loudly if the pinned SGLang moves them.

Needs the ``sglang`` extra (CI installs it); skipped without it.
"""

from __future__ import annotations


from conftest import require_module

sglang = require_module("sglang")

# Flags whose names and meanings the engine's CLI mirrors, so a script written against one works on the other.
MIRRORED_FLAGS = ["speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
                  "speculative_eagle_topk", "speculative_num_draft_tokens"]


def test_pinned_release():
    assert sglang.__version__ == "0.5.23"


def test_server_args_has_the_speculative_flags_we_mirror():
    from sglang.srt.server_args import ServerArgs

    fields = set(ServerArgs.__struct_fields__)
    missing = [name for name in MIRRORED_FLAGS if name not in fields]
    assert not missing, f"ServerArgs lost {missing}"


def test_plugin_and_speculative_registries_import():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    assert callable(load_plugins)
    assert hasattr(SpeculativeAlgorithm, "register") and hasattr(SpeculativeAlgorithm, "from_string")
