"""SimPy discrete-event simulator of a speculative serving engine (trace replay, measured costs, tuning).

It will import its policies, sampling rules and drafter models from :mod:`sglang_ext.core`, never copy them.
"""
