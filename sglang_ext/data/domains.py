"""Which domain a conversation belongs to: ``code``, ``math`` or ``chat``, by stated text rules.

A workload-shift study needs a drafter that has *never* seen the new domains, so its training corpus
(ShareGPT, which mixes code, maths and chat) is filtered. The filter is a set of plain, documented
rules rather than a learned classifier: it must be reproducible, explainable in one paragraph of a
report, and strict. A false positive only drops a chat conversation from training; a false negative
leaks the new domain into the "unseen" drafter, which is the error that matters, so every rule leans
towards calling a text code or maths.

Rules (a conversation is ``code`` if any message is code, else ``math`` if any message is maths):

- **code**: a fenced block (three backticks), or at least ``CODE_LINES`` lines that look like source
  (a statement keyword at the start of a line such as ``def``/``import``/``#include``/``public``, a line
  ending in ``{``, ``}`` or ``;``, an HTML/XML tag line, a shell prompt), or a programming term anywhere
  (a language or tool name, ``function``, ``algorithm``, ``array``, ``code``, ``compile`` ...).
- **math**: LaTeX (``\\frac``, ``$...$``, ``\\(``), an arithmetic expression (``12 * 7``, ``x^2``, ``x+y``),
  a maths term (``equation``, ``solve``, ``integral``, ``probability`` ...), or a word problem: ``how many``
  or ``how much`` with a number in the same message, or any question (``how``, ``what``, ``which``, ``find``,
  ``?``) with ``QUESTION_NUMBERS`` numbers, digits or words (``ten``, ``twice``, ``half`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

DOMAINS = ("code", "math", "chat")

CODE_LINES = 3
"""Source-looking lines in one message that make it code without a fence or a programming term."""

WORD_PROBLEM_NUMBERS = 1
"""Numbers in a message with ``how many``/``how much`` that make it a maths word problem."""

QUESTION_NUMBERS = 2
"""Numbers (digits or number words) in a question that make it maths: quantities to reason over."""

_FENCE = re.compile(r"```|~~~")
_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \S+ import |#include|#define|public |private |protected |static |"
    r"function[ (]|const |let |var |return\b|if ?\(|for ?\(|while ?\(|elif |else:|try:|except\b|print\(|"
    r"console\.|System\.|SELECT |INSERT |UPDATE |CREATE TABLE|<\/?[a-zA-Z][\w-]*(?:\s[^>]*)?>|\$ |>>> |@\w+)"
    r"|[{};]\s*$",
    re.MULTILINE)
_CODE_TERMS = re.compile(
    r"\b(?:python|javascript|typescript|java|c\+\+|c#|golang|rust|ruby|php|kotlin|swift|scala|sql|html|css|"
    r"bash|shell script|regex|json|yaml|api|sdk|function|functions|variable|compiler?|debug|syntax|script|"
    r"code|coding|programming|algorithm|arrays?|linked list|binary tree|github|docker|kubernetes|linux|npm|"
    r"django|flask|react|node\.?js)\b",
    re.IGNORECASE)
_LATEX = re.compile(r"\\(?:frac|sqrt|sum|int|cdot|times|div|pi|theta|alpha|beta|le|ge|neq|left|right)\b|"
                    r"\$[^$\n]+\$|\\\(|\\\[")
_ARITHMETIC = re.compile(r"\d\s*[-+*/×÷^=]\s*\(?\d|\b[a-z]\s*\^\s*\d|\b\d+\s*%\s*of\b|\d\s*[x×]\s*\d|"
                         r"\b[a-z]\s*[+*/^=]\s*\d*[a-z]\b")
_MATH_TERMS = re.compile(
    r"\b(?:equation|equations|solve|solving|calculate|calculation|compute|arithmetic|algebra|geometry|"
    r"calculus|integral|derivative|differentiate|integrate|probability|theorem|proof|polynomial|"
    r"fraction|percentage|percent|sum of|product of|remainder|divisible|square root|factorial|"
    r"logarithm|matrix|vector|statistics|mean|median|variance|average)\b",
    re.IGNORECASE)
_WORD_PROBLEM = re.compile(r"\bhow (?:many|much)\b", re.IGNORECASE)
_QUESTION = re.compile(r"\b(?:how|what|which|find)\b|\?", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?<![\w.])\$?\d+(?:[.,]\d+)?|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"fifteen|sixteen|twenty|thirty|fifty|hundred|thousand|twice|half|double|triple|quarter)\b",
    re.IGNORECASE)


def is_code(text: str) -> bool:
    """Whether ``text`` holds source code or asks about programming (module rules, ``code``)."""
    if _FENCE.search(text):
        return True
    if len(_CODE_LINE.findall(text)) >= CODE_LINES:
        return True
    return bool(_CODE_TERMS.search(text))


def is_math(text: str) -> bool:
    """Whether ``text`` holds or asks for mathematics (module rules, ``math``)."""
    if _LATEX.search(text) or _ARITHMETIC.search(text) or _MATH_TERMS.search(text):
        return True
    numbers = len(_NUMBER.findall(text))
    if _WORD_PROBLEM.search(text) and numbers >= WORD_PROBLEM_NUMBERS:
        return True
    return bool(numbers >= QUESTION_NUMBERS and _QUESTION.search(text))


def text_domain(text: str) -> str:
    """``code``, ``math`` or ``chat`` for one text; code wins over maths (code often holds arithmetic)."""
    if is_code(text):
        return "code"
    if is_math(text):
        return "math"
    return "chat"


def conversation_domain(messages: Sequence[Mapping[str, str]]) -> str:
    """The domain of a whole conversation: ``code`` if any message is code, else ``math`` if any is, else ``chat``.

    Every message counts, the assistant's included: a chat question whose answer is a program still
    teaches a drafter code.
    """
    domains = {text_domain(m.get("content", "")) for m in messages}
    for domain in ("code", "math"):
        if domain in domains:
            return domain
    return "chat"


def parse_domains(text: str, flag: str = "--exclude-domains") -> tuple[str, ...]:
    """Comma-separated domain names, validated; a bad name raises naming ``flag`` and the allowed names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in DOMAINS]
    if bad or not names:
        raise ValueError(f"{flag}: expected a comma-separated subset of {', '.join(DOMAINS)}, got {text!r}")
    return names


def filter_conversations(conversations: Iterable[Sequence[Mapping[str, str]]], exclude: Iterable[str]
                         ) -> tuple[list, dict[str, int]]:
    """``(kept, counts)``: conversations whose domain is not in ``exclude``, and how many of each domain were seen."""
    exclude = set(exclude)
    kept, counts = [], dict.fromkeys(DOMAINS, 0)
    for conv in conversations:
        domain = conversation_domain(conv)
        counts[domain] += 1
        if domain not in exclude:
            kept.append(conv)
    return kept, counts
