"""The code / maths / chat filter that keeps new domains out of a chat-only drafter's training data."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_ext.data.domains import (DOMAINS, conversation_domain, filter_conversations, parse_domains,
                                     text_domain)

CODE = [
    "Complete the following Python function.\n\ndef add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
    "Here is the fix:\n```js\nconst x = 1;\n```",
    "#include <stdio.h>\nint main() {\n  printf(\"hi\");\n  return 0;\n}",
    "How do I write a python function that reverses a list? I tried reverse(lst) but it returns None.",
    "SELECT name FROM users WHERE id = 3;\nUPDATE users SET name = 'a';\nINSERT INTO t VALUES (1);",
    "<div class=\"box\">\n<p>hello</p>\n</div>",
]
MATH = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Solve for x: 3x + 5 = 20.",
    "What is 17 * 23?",
    "Prove the theorem that the square root of 2 is irrational.",
    "Compute $\\frac{1}{2} + \\frac{1}{3}$.",
    "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. How much did she earn?",
    "What is the probability of rolling two sixes?",
]
CHAT = [
    "What are some good books to read on a rainy afternoon?",
    "Write a short poem about the sea at dawn.",
    "Can you help me plan a three-day trip to Lisbon? I like museums and food.",
    "Tell me about the history of the Roman Empire in a few paragraphs.",
    "How many countries are there in Europe?",  # "how many" with no numbers: a fact question, not a word problem
    "I feel nervous before my job interview tomorrow. Any tips?",
]


@pytest.mark.parametrize("text", CODE)
def test_code_is_code(text):
    assert text_domain(text) == "code"


@pytest.mark.parametrize("text", MATH)
def test_math_is_math(text):
    assert text_domain(text) == "math"


@pytest.mark.parametrize("text", CHAT)
def test_chat_is_chat(text):
    assert text_domain(text) == "chat"


def test_a_conversation_takes_its_strongest_domain_from_any_message():
    chat = [{"role": "user", "content": CHAT[0]}, {"role": "assistant", "content": "Try Dune."}]
    answer_is_code = [{"role": "user", "content": "Show me."}, {"role": "assistant", "content": CODE[1]}]
    code_and_math = [{"role": "user", "content": MATH[2]}, {"role": "assistant", "content": CODE[0]}]
    assert conversation_domain(chat) == "chat"
    assert conversation_domain(answer_is_code) == "code"
    assert conversation_domain(code_and_math) == "code"
    assert conversation_domain([{"role": "user", "content": MATH[0]}]) == "math"


def test_filter_keeps_only_allowed_domains_and_counts_all():
    convs = [[{"role": "user", "content": t}] for t in CODE + MATH + CHAT]
    kept, counts = filter_conversations(convs, ("code", "math"))
    assert counts == {"code": len(CODE), "math": len(MATH), "chat": len(CHAT)}
    assert [c[0]["content"] for c in kept] == CHAT


@given(st.lists(st.sampled_from(CODE + MATH + CHAT), min_size=1, max_size=6))
def test_adding_a_message_never_makes_a_conversation_more_chat(texts):
    """Monotone: a conversation's domain rank (code > math > chat) never drops when a message is added."""
    rank = {"code": 2, "math": 1, "chat": 0}
    convs = [{"role": "user", "content": t} for t in texts]
    for k in range(1, len(convs)):
        assert rank[conversation_domain(convs[:k + 1])] >= rank[conversation_domain(convs[:k])]


def test_parse_domains_names_the_flag():
    assert parse_domains("code, math") == ("code", "math")
    with pytest.raises(ValueError, match="--exclude-domains.*code, math, chat"):
        parse_domains("code,poetry")
    with pytest.raises(ValueError, match="--exclude-domains"):
        parse_domains(",")
    assert set(DOMAINS) == {"code", "math", "chat"}


def test_train_drafter_rejects_an_unknown_domain(capsys):
    from sglang_ext.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-drafter", "--exclude-domains", "poetry"])
    assert e.value.code == 2
    assert "--exclude-domains" in capsys.readouterr().err


def test_filter_on_the_shipped_prompt_sets_when_fetched():
    """On real HumanEval and GSM8K prompts (when fetched) the filter calls nearly every prompt by its set's domain."""
    from sglang_ext.data.packaged_prompts import prompt_set_path

    checked = 0
    for name, domain in (("humaneval", "code"), ("gsm8k", "math")):
        path = prompt_set_path(name)
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        hits = sum(text_domain(r["prompt"]) == domain for r in rows)
        assert hits / len(rows) >= 0.95, (name, hits, len(rows))
        checked += 1
    if not checked:
        pytest.skip("humaneval / gsm8k not fetched (sglang-ext data fetch humaneval gsm8k)")
