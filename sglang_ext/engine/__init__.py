"""Hosts that run the core on a real model (the full batched reference engine grows here)."""
