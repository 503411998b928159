"""Request parsing and response shapes of the HTTP server: OpenAI's error schema (:class:`ApiError`), typed
field access whose errors name the field, sampling parameters, prompts and chat conversations, and the
incremental detokeniser of streams. Nothing here touches the engine's state.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from fastapi.responses import JSONResponse

from sglang_ext.core.processing import SamplingParams
from sglang_ext.engine.engine import GenerationRequest, RequestError

from .runner import EngineRunner

log = logging.getLogger("sglang_ext.server")

# ---- request parsing --------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error response in OpenAI's shape; ``param`` names the offending field, ``code`` is a string or None."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else DEFAULT_ERROR_CODES.get(status)
        self.type = type_ or _error_type(status)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.type, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


#: ``error.code`` when the raiser names none: OpenAI's codes are strings or null, never the HTTP status
DEFAULT_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 500: "internal_error",
                       503: "service_unavailable"}


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error schema, the same for every error of every endpoint (and for errors inside a stream)::

        {"object": "error", "error": {"message": str, "type": str, "param": str | null, "code": str | null}}

    ``type`` is ``invalid_request_error`` below 500 and ``server_error`` from 500; ``code`` is a string such as
    ``model_not_found``, ``context_length_exceeded``, ``unknown_parameter``, ``unsupported_parameter``,
    ``request_too_large`` or ``server_shutting_down``, or null. (SGLang's and vLLM's bodies carry the HTTP status
    as an integer ``code``; the status line already says it, and OpenAI's clients expect a string.)
    """
    return {"object": "error", "error": {"message": message, "type": type_ or _error_type(status), "param": param,
                                         "code": code if code is not None else DEFAULT_ERROR_CODES.get(status)}}


def error_response(status: int, message: str, param: str | None = None, type_: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type_, code), status_code=status)


_MISSING = object()


class Fields:
    """Typed access to a JSON object's fields; each error names the field (with ``prefix``, e.g. ``sampling_params.``)."""

    def __init__(self, obj: dict, prefix: str = "") -> None:
        self.obj, self.prefix = obj, prefix

    def fail(self, name: str, message: str) -> ApiError:
        return ApiError(400, f"{self.prefix}{name}: {message}", f"{self.prefix}{name}")

    def get(self, name: str):
        value = self.obj.get(name, _MISSING)
        return _MISSING if value is None else value

    def int(self, name: str, default: int | None, minimum: int | None = None) -> int | None:
        v = self.get(name)
        if v is _MISSING:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"expected an integer, got {json.dumps(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {v}")
        return v

    def float(self, name: str, default: float, minimum: float | None = None) -> float:
        v = self.get(name)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(name, f"expected a number, got {json.dumps(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {v}")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        v = self.get(name)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            raise self.fail(name, f"expected true or false, got {json.dumps(v)}")
        return v

    def stop(self, name: str) -> list[str]:
        v = self.get(name)
        if v is _MISSING:
            return []
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise self.fail(name, "expected a non-empty string or a list of non-empty strings")
        return list(items)

    def int_list(self, name: str) -> list[int]:
        v = self.get(name)
        if v is _MISSING:
            return []
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise self.fail(name, "expected a list of integers")
        return list(v)

    def unsupported(self, name: str, neutral: tuple = (None, False, 0, 0.0, "", [], {})) -> None:
        v = self.obj.get(name)
        if v not in neutral:
            raise ApiError(400, f"{self.prefix}{name}: not supported by this server (got {json.dumps(v)})",
                           f"{self.prefix}{name}", code="unsupported_parameter")


def sampling_from(f: Fields, temperature_default: float = 1.0) -> SamplingParams:
    temperature = f.float("temperature", temperature_default, minimum=0.0)
    top_p = f.float("top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise f.fail("top_p", f"must be in (0, 1], got {top_p}")
    top_k = f.int("top_k", -1)
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if top_k and top_k > 0 else -1)


def max_new(requested: int | None, default: int, prompt_len: int, context: int) -> int:
    """An explicit limit is kept (the engine rejects it if too long); a default is clamped to the room left."""
    if requested is not None:
        return requested
    return max(1, min(default, context - prompt_len))


def encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ApiError(400, "prompt: this server has no tokenizer; send token ids", "prompt")
    return [int(t) for t in tokenizer.encode(text)]


def chat_ids(tokenizer, messages: object) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
    conv = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}.role: expected system, user, assistant or tool, got {json.dumps(role)}",
                           f"{where}.role")
        if content is None:
            content = ""
        elif isinstance(content, list):  # OpenAI content parts: text only
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string or a list of text parts", f"{where}.content")
        conv.append({"role": "system" if role == "developer" else role, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "messages: the served model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    try:
        enc = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)
    except Exception as e:  # jinja raises TemplateError for conversations the template refuses
        raise ApiError(400, f"messages: the chat template refused this conversation ({e})", "messages") from e
    ids = enc["input_ids"]
    if ids and not isinstance(ids[0], int):
        ids = ids[0]
    return [int(t) for t in ids]


def completion_prompt(tokenizer, body: dict) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "prompt: required (a string or a list of token ids)", "prompt")
    if isinstance(p, str):
        return encode(tokenizer, p)
    if isinstance(p, list):
        if p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        if len(p) == 1 and isinstance(p[0], str):
            return encode(tokenizer, p[0])
        if len(p) == 1 and isinstance(p[0], list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p[0]):
            return list(p[0])
        if len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise ApiError(400, f"prompt: batches of {len(p)} prompts are not supported; send one request per prompt",
                           "prompt")
    raise ApiError(400, "prompt: expected a string, a list of token ids, or a one-element list of either", "prompt")


def check_model(body: dict, runner: EngineRunner) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "model: expected a string", "model")
    if model not in served_names(runner):
        raise ApiError(404, f"model: the model `{model}` does not exist; this server serves `{runner.model_name}`",
                       "model", type_="invalid_request_error", code="model_not_found")


def served_names(runner: EngineRunner) -> set[str]:
    return {runner.model_name, str(runner.info.get("model_path") or runner.model_name), "default"}


@dataclass
class OpenAIOptions:
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0  # completions: ``logprobs=N``; chat: ``top_logprobs``


#: at most this many choices per request (``n``) and alternatives per position (``top_logprobs``), like vLLM
MAX_N = 16
MAX_TOP_LOGPROBS = 20


def openai_request(body: dict, runner: EngineRunner, prompt_ids: list[int], default_max: int,
                   chat: bool) -> tuple[GenerationRequest, OpenAIOptions]:
    """The engine request and the response options of one OpenAI completions/chat body.

    ``logprobs``: completions take an integer (the number of alternatives, 0 = the chosen token only), chat a
    boolean plus ``top_logprobs``. ``n > 1`` gives ``n`` engine requests (the server copies this one with
    per-choice seeds); ``best_of`` may only equal ``n``.
    """
    f = Fields(body)
    n = f.int("n", 1, minimum=1)
    if n > MAX_N:
        raise f.fail("n", f"at most {MAX_N} choices per request, got {n}")
    best_of = f.int("best_of", n)
    if best_of != n:
        raise ApiError(400, f"best_of: only best_of == n is supported, got best_of {best_of} with n {n}", "best_of",
                       code="unsupported_parameter")
    for name in ("echo", "frequency_penalty", "presence_penalty", "logit_bias", "tools", "suffix"):
        f.unsupported(name)
    if chat:
        logprobs = f.bool("logprobs", False)
        top = f.int("top_logprobs", None, minimum=0)
        if top is not None and not logprobs:
            raise f.fail("top_logprobs", "needs \"logprobs\": true")
        top = top or 0
        top_name = "top_logprobs"
    else:
        top = f.int("logprobs", None, minimum=0)
        logprobs, top = top is not None, top or 0
        top_name = "logprobs"
    if top > MAX_TOP_LOGPROBS:
        raise f.fail(top_name, f"at most {MAX_TOP_LOGPROBS} alternatives per token, got {top}")
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format",
                       code="unsupported_parameter")
    max_tokens = f.int("max_tokens", None, minimum=1)
    if chat and max_tokens is None:
        max_tokens = f.int("max_completion_tokens", None, minimum=1)
    sampling = sampling_from(f)
    stream = f.bool("stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise f.fail("stream_options", "expected an object")
    include_usage = Fields(so or {}, "stream_options.").bool("include_usage", False)
    req = GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=max_new(max_tokens, default_max, len(prompt_ids), runner.engine.context_length),
        sampling=sampling, stop=f.stop("stop"), stop_token_ids=f.int_list("stop_token_ids"),
        ignore_eos=f.bool("ignore_eos", False), seed=f.int("seed", None),
        logprobs=logprobs, top_logprobs=top,
    )
    return req, OpenAIOptions(stream=stream, include_usage=include_usage, n=n, logprobs=logprobs, top_logprobs=top)


def validate_request(runner: EngineRunner, req: GenerationRequest, names: dict[str, str]) -> None:
    """The engine's checks, with its field names (``prompt``, ``max_new_tokens``) renamed to this endpoint's."""
    try:
        runner.validate(req)
    except RequestError as e:
        raise request_error(e, names) from e


def request_error(e: Exception, names: dict[str, str], status: int = 400) -> ApiError:
    """An engine ``RequestError`` (``"field: message"``) as an API error naming this endpoint's parameter."""
    text = str(e)
    code = "context_length_exceeded" if "context length" in text else None
    field, sep, rest = text.partition(": ")
    if sep and " " not in field:
        param = names.get(field, field)
        return ApiError(status, f"{param}: {rest}", param, code=code)
    return ApiError(status, text, code=code)


# ---- streaming text ------------------------------------------------------------------------------------------
class StreamText:
    """Incremental detokenisation that never takes back text: holds back an unfinished UTF-8 character and any
    tail that could still become a stop string, and truncates at a complete stop string (the engine drops it)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = len(text)
        while cut > 0 and text[cut - 1] == "\ufffd":
            cut -= 1
        for s in self.stop:
            pos = text.find(s)
            if pos >= 0:
                cut = min(cut, pos)
            for k in range(min(len(s) - 1, cut), 0, -1):  # a tail that is a prefix of a stop string
                if text[cut - k:cut] == s[:k]:
                    cut -= k
                    break
        return self._emit(text[:cut])

    def finish(self, final_text: str) -> str:
        if not final_text.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final text; sending no tail")
            return ""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def openai_finish(reason: dict | None) -> str | None:
    if not reason:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.get("type"), reason.get("type"))


def usage(meta: dict) -> dict:
    p, c = meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---- fields a request may carry -----------------------------------------------------------------------------
#: OpenAI fields the server reads (or checks are neutral: ``Fields.unsupported``), per endpoint, plus SGLang's
#: and vLLM's extras it honours (``top_k``, ``stop_token_ids``, ``ignore_eos``)
_OPENAI_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
                  "stop_token_ids", "ignore_eos", "seed", "logprobs", "frequency_penalty", "presence_penalty",
                  "logit_bias", "response_format", "tools"}
#: fields that change nothing here and are accepted silently (bookkeeping or tool plumbing without tools)
_OPENAI_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice", "modalities"}
COMPLETION_FIELDS = frozenset(_OPENAI_COMMON | _OPENAI_HARMLESS | {"prompt", "best_of", "echo", "suffix"})
CHAT_FIELDS = frozenset(_OPENAI_COMMON | _OPENAI_HARMLESS | {"messages", "max_completion_tokens", "top_logprobs"})
GENERATE_FIELDS = frozenset({"text", "input_ids", "sampling_params", "stream", "rid", "return_logprob",
                             "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "image_data",
                             "lora_path"})
#: the header that lists the fields a request carried and the server ignored (``--reject-unknown-fields`` off)
IGNORED_FIELDS_HEADER = "X-Ignored-Fields"


def unknown_fields(body: dict, known: frozenset[str], reject: bool) -> list[str]:
    """Fields of ``body`` this endpoint does not know. With ``reject`` the first one is a 400
    (``unknown_parameter``, naming it and the closest known field: ``max_token`` → ``max_tokens``); otherwise the
    caller logs them and lists them in the :data:`IGNORED_FIELDS_HEADER` response header (vLLM logs the same).
    A typo must not pass silently either way."""
    unknown = sorted(k for k in body if k not in known)
    if unknown and reject:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ApiError(400, f"{name}: unrecognized request argument{hint} (--reject-unknown-fields is on)", name,
                       code="unknown_parameter")
    if unknown:
        log.warning("request fields ignored (unknown to this endpoint): %s", ", ".join(unknown))
    return unknown


# ---- logprobs in each API's shape ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Token id → (text, bytes) for logprob entries, cached per id.

    A token that is part of a multi-byte character decodes to ``\ufffd`` on its own; its text is then vLLM's
    ``"bytes:\\xe2\\x80"`` notation and ``bytes`` are its raw bytes (from the byte-level BPE alphabet). Without a
    tokenizer (a token-id server) the text is ``"token_id:N"`` and bytes are None.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, tid: int) -> tuple[str, list[int] | None]:
        hit = self._cache.get(tid)
        if hit is None:
            hit = self._cache[tid] = self._lookup(tid)
        return hit

    def _lookup(self, tid: int) -> tuple[str, list[int] | None]:
        if self.tokenizer is None:
            return f"token_id:{tid}", None
        text = self.tokenizer.decode([tid])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer.convert_ids_to_tokens(tid) or ""
        decoder = _byte_decoder()
        raw = bytes(decoder[c] for c in piece) if piece and all(c in decoder for c in piece) else text.encode()
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def completion_logprobs(ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]] | None,
                        texts: TokenTexts, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (each position's
    ``logprobs=N`` most likely tokens plus the chosen one, as vLLM returns) and ``text_offset``."""
    tokens, offsets, top = [], [], []
    for i, (tid, lp) in enumerate(zip(ids, lps)):
        text = texts(tid)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        alts = {texts(a)[0]: v for a, v in (tops[i] if tops else [])}
        alts.setdefault(text, lp)
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]] | None,
                  texts: TokenTexts) -> dict:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    def entry(tid: int, lp: float) -> dict:
        text, raw = texts(tid)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [{**entry(tid, lp), "top_logprobs": [entry(a, v) for a, v in (tops[i] if tops else [])]}
                        for i, (tid, lp) in enumerate(zip(ids, lps))]}


def sglang_logprobs(ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]] | None,
                    texts: TokenTexts, with_text: bool) -> dict:
    """SGLang's ``meta_info`` logprob fields: ``output_token_logprobs`` as ``[logprob, token_id, text | None]``
    per token, ``output_top_logprobs`` as a list of those per token (empty without ``top_logprobs_num``); input
    logprobs are not computed (``logprob_start_len`` -1, SGLang's default), so their lists are empty."""
    def entry(tid: int, lp: float) -> list:
        return [lp, tid, texts(tid)[0] if with_text else None]

    return {"input_token_logprobs": [], "input_top_logprobs": [],
            "output_token_logprobs": [entry(t, lp) for t, lp in zip(ids, lps)],
            "output_top_logprobs": [[entry(a, v) for a, v in (tops[i] if tops else [])] for i in range(len(ids))]}
