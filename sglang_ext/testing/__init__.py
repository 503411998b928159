"""Test helpers for users of sglang-ext: point the lossless checker at your own verify kernel."""
