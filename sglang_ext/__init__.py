"""sglang-ext: adaptive speculative decoding for SGLang (lossless core, engine, plugin, simulator)."""

__version__ = "0.1.0"
