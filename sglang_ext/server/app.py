"""HTTP front end: OpenAI ``/v1/completions`` and ``/v1/chat/completions``, SGLang's ``/generate``,
``/server_info`` and Prometheus ``/metrics``, over one reference :class:`~sglang_ext.engine.engine.Engine`
owned by an :class:`~sglang_ext.server.runner.EngineRunner` thread.

The event loop only parses, validates and formats: the body is read with a size bound (413 past
``--max-request-bytes``), and tokenising and chat templating run in worker threads (HF's fast tokenizer releases
the GIL), so one huge prompt cannot stall ``/health`` or other requests. Engine events arrive on an asyncio
queue per request through ``loop.call_soon_threadsafe``.

Responses carry SGLang's per-request ``meta_info`` (``spec_verify_ct``, ``spec_accept_length`` ...), at the top
level and per choice, and in the last stream chunk, so scripts written against SGLang find the same fields.
Errors follow OpenAI's schema (:func:`~sglang_ext.server.protocol.error_body`) everywhere, streams included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang_ext.engine.engine import GenerationRequest

from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    GENERATE_FIELDS,
    IGNORED_FIELDS_HEADER,
    MAX_N,
    MAX_TOP_LOGPROBS,
    ApiError,
    Fields,
    OpenAIOptions,
    StreamText,
    TokenTexts,
    chat_ids,
    chat_logprobs,
    check_model,
    completion_logprobs,
    completion_prompt,
    encode,
    error_body,
    error_response,
    max_new,
    openai_finish,
    openai_request,
    sampling_from,
    sglang_logprobs,
    sse,
    unknown_fields,
    usage,
    validate_request,
)
from .runner import EngineRunner, Event, Finished, ServerMetrics

log = logging.getLogger("sglang_ext.server")

#: default ``--max-request-bytes``: far above any prompt that fits a 4k-32k context, far below what stalls a server
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
#: bodies above this are parsed off the event loop too
_PARSE_IN_THREAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """What ``sglang-ext serve`` flags set about HTTP handling (the engine's flags live in ``engine.launch``)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    reject_unknown_fields: bool = False


# ---- requests as seen from the event loop ----------------------------------------------------------------------
class _Choices:
    """The ``n`` engine requests of one API request (``n`` = 1 mostly), each a choice, on one asyncio queue.

    Choice ``i`` is the request with seed ``seed + i`` when the client gave a seed (so a choice can be reproduced
    alone), otherwise the runner's next seed. Events arrive as ``(i, event)``; the choices finish independently.
    """

    def __init__(self, runner: EngineRunner, req: GenerationRequest, n: int = 1) -> None:
        self.runner = runner
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: list[str] = []
        self.open: set[int] = set()
        try:
            for i in range(n):
                choice = req if n == 1 else replace(
                    req, seed=None if req.seed is None else req.seed + i,
                    rid=None if req.rid is None else f"{req.rid}-{i}")
                self.rids.append(runner.submit(choice, self._sink(i)))
                self.open.add(i)
        except RuntimeError as e:
            self.abort_if_running()
            raise ApiError(503, f"server: {e}", type_="server_error") from e

    @property
    def rid(self) -> str:
        return self.rids[0]

    def _sink(self, i: int):
        def deliver(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass
        return deliver

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            i, event = await self.queue.get()
            if event[0] in ("done", "error"):
                self.open.discard(i)
            yield i, event

    async def results(self) -> list[Finished]:
        """Every choice's result; the first error fails the request (and aborts the other choices)."""
        out: list[Finished | None] = [None] * len(self.rids)
        try:
            async for i, event in self.events():
                if event[0] == "done":
                    out[i] = event[1]
                elif event[0] == "error":
                    raise ApiError(event[1], event[2], code=event[3] if len(event) > 3 else None)
        finally:
            self.abort_if_running()
        if any(f is None for f in out):
            raise ApiError(500, "request ended without a result")
        return out  # type: ignore[return-value]

    def abort_if_running(self) -> None:
        for i in sorted(self.open):
            self.runner.abort(self.rids[i])
        self.open.clear()


def _stream_error(event: Event) -> str:
    status, message = event[1], event[2]
    return sse(error_body(status, message, code=event[3] if len(event) > 3 else None))


def _json(content: dict | list, ignored: list[str]) -> JSONResponse:
    return JSONResponse(content, headers={IGNORED_FIELDS_HEADER: ", ".join(ignored)} if ignored else None)


def _stream(gen: AsyncIterator[str], ignored: list[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={IGNORED_FIELDS_HEADER: ", ".join(ignored)} if ignored else None)


def _sum_usage(fins: list[Finished]) -> dict:
    """OpenAI's usage for ``n`` choices: the prompt once, every choice's completion tokens."""
    prompt = fins[0].meta_info.get("prompt_tokens", 0)
    completion = sum(f.meta_info.get("completion_tokens", 0) for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- the app ---------------------------------------------------------------------------------------------------
def create_app(runner: EngineRunner, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app; it starts ``runner`` on startup if it is not running and stops it on shutdown."""
    from contextlib import asynccontextmanager

    opts = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        owned = runner._thread is None
        runner.start()
        yield
        if owned:
            runner.stop()

    app = FastAPI(title="sglang-ext reference server", lifespan=lifespan)
    app.state.runner = runner
    app.state.options = opts
    tok = runner.tokenizer
    texts = TokenTexts(tok)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"{type(exc).__name__}: {exc}")

    def too_large(size: int | str) -> ApiError:
        return ApiError(413, f"body: {size} bytes exceed the server's limit of {opts.max_request_bytes} bytes "
                             "(--max-request-bytes)", "body", code="request_too_large")

    async def json_body(request: Request) -> dict:
        """The JSON object of the body, read with the size bound (a declared or a streamed size past it is a
        413 before the rest is read) and parsed off the loop when large."""
        limit = opts.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise ApiError(400, "body: empty request body; expected a JSON object", "body")
        try:
            body = await asyncio.to_thread(json.loads, raw) if len(raw) > _PARSE_IN_THREAD_BYTES else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            detail = f"{e.msg} at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ApiError(400, f"body: invalid JSON ({detail})", "body") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}", "body")
        return body

    def need_tokenizer() -> None:
        if tok is None:
            raise ApiError(400, "prompt: this server has no tokenizer; send token ids", "prompt")

    # ---- OpenAI ---------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        ignored = unknown_fields(body, COMPLETION_FIELDS, opts.reject_unknown_fields)
        check_model(body, runner)
        ids = await asyncio.to_thread(completion_prompt, tok, body)
        req, o = openai_request(body, runner, ids, default_max=16, chat=False)
        validate_request(runner, req, {"prompt": "prompt", "max_new_tokens": "max_tokens"})
        choices = _Choices(runner, req, o.n)
        meta = {"id": f"cmpl-{choices.rid}", "created": int(time.time()), "model": runner.model_name}
        if o.stream:
            return _stream(_stream_openai(choices, req, o, meta, chat=False), ignored)
        fins = await choices.results()
        out = []
        for i, fin in enumerate(fins):
            lp = completion_logprobs(fin.output_ids, fin.token_logprobs, fin.top_logprobs, texts) if o.logprobs else None
            out.append({"index": i, "text": fin.text, "logprobs": lp, "finish_reason": openai_finish(fin.finish_reason),
                        "matched_stop": (fin.finish_reason or {}).get("matched"), "meta_info": fin.meta_info})
        return _json({**meta, "object": "text_completion", "choices": out, "usage": _sum_usage(fins),
                      "meta_info": fins[0].meta_info}, ignored)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        ignored = unknown_fields(body, CHAT_FIELDS, opts.reject_unknown_fields)
        check_model(body, runner)
        need_tokenizer()
        ids = await asyncio.to_thread(chat_ids, tok, body.get("messages"))
        req, o = openai_request(body, runner, ids, default_max=128, chat=True)
        validate_request(runner, req, {"prompt": "messages", "max_new_tokens": "max_tokens"})
        choices = _Choices(runner, req, o.n)
        meta = {"id": f"chatcmpl-{choices.rid}", "created": int(time.time()), "model": runner.model_name}
        if o.stream:
            return _stream(_stream_openai(choices, req, o, meta, chat=True), ignored)
        fins = await choices.results()
        out = []
        for i, fin in enumerate(fins):
            lp = chat_logprobs(fin.output_ids, fin.token_logprobs, fin.top_logprobs, texts) if o.logprobs else None
            out.append({"index": i, "message": {"role": "assistant", "content": fin.text}, "logprobs": lp,
                        "finish_reason": openai_finish(fin.finish_reason),
                        "matched_stop": (fin.finish_reason or {}).get("matched"), "meta_info": fin.meta_info})
        return _json({**meta, "object": "chat.completion", "choices": out, "usage": _sum_usage(fins),
                      "meta_info": fins[0].meta_info}, ignored)

    async def _stream_openai(choices: _Choices, req: GenerationRequest, o: OpenAIOptions, meta: dict,
                             chat: bool) -> AsyncIterator[str]:
        """OpenAI chunks, each for one choice (``index``); a choice's last chunk has its ``finish_reason``, usage
        and ``meta_info``; with logprobs, a chunk carries the logprobs of the tokens that arrived with it."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: str | None, finish: str | None = None, logprobs: dict | None = None,
                  **extra) -> dict:
            if chat:
                d = {} if delta is None else {"content": delta}
                choice = {"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            if "matched_stop" in extra:
                choice["matched_stop"] = extra.pop("matched_stop")
            return {**meta, "object": obj, "choices": [choice], **extra}

        stream_texts = [StreamText(tok, req.stop) for _ in choices.rids]
        offsets = [0] * len(choices.rids)
        finished: list[Finished] = []
        try:
            if chat:
                for i in range(len(choices.rids)):
                    first = chunk(i, None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield sse(first)
            async for i, event in choices.events():
                if event[0] == "tokens":
                    delta = stream_texts[i].add(event[1])
                    lp = None
                    if o.logprobs:
                        lp = (chat_logprobs(event[1], event[2], event[3], texts) if chat else
                              completion_logprobs(event[1], event[2], event[3], texts, offsets[i]))
                        if not chat:
                            offsets[i] += sum(len(t) for t in lp["tokens"])
                    if delta or lp is not None:
                        yield sse(chunk(i, delta, logprobs=lp))
                elif event[0] == "done":
                    fin: Finished = event[1]
                    finished.append(fin)
                    tail = stream_texts[i].finish(fin.text)
                    if tail:
                        yield sse(chunk(i, tail))
                    yield sse(chunk(i, None, openai_finish(fin.finish_reason), usage=usage(fin.meta_info),
                                    meta_info=fin.meta_info, matched_stop=(fin.finish_reason or {}).get("matched")))
                else:
                    yield _stream_error(event)
                    choices.abort_if_running()
                    break
            else:
                if o.include_usage and finished:
                    yield sse({**meta, "object": obj, "choices": [], "usage": _sum_usage(finished)})
            yield sse("[DONE]")
        finally:
            choices.abort_if_running()  # the client went away mid-stream

    # ---- SGLang native ----------------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        body = await json_body(request)
        ignored = unknown_fields(body, GENERATE_FIELDS, opts.reject_unknown_fields)
        has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
        if has_text == has_ids:
            raise ApiError(400, "text: give exactly one of text or input_ids", "text")
        if has_text:
            text = body["text"]
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str):
                raise ApiError(400, "text: expected a string (batches are not supported; send one request each)", "text")
            need_tokenizer()
            ids = await asyncio.to_thread(encode, tok, text)
        else:
            raw = body["input_ids"]
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], list):
                raw = raw[0]
            if not (isinstance(raw, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)):
                raise ApiError(400, "input_ids: expected a list of integers (one prompt per request)", "input_ids")
            ids = list(raw)
        f = Fields(body)
        for name in ("image_data", "lora_path"):
            f.unsupported(name)
        return_logprob = f.bool("return_logprob", False)
        top_num = f.int("top_logprobs_num", 0, minimum=0)
        if top_num > MAX_TOP_LOGPROBS:
            raise f.fail("top_logprobs_num", f"at most {MAX_TOP_LOGPROBS} alternatives per token, got {top_num}")
        start = f.int("logprob_start_len", -1)
        if start != -1:
            raise ApiError(400, f"logprob_start_len: only -1 (output logprobs only) is supported, got {start}; input "
                                "logprobs are not computed", "logprob_start_len", code="unsupported_parameter")
        with_text = f.bool("return_text_in_logprobs", False)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise ApiError(400, "sampling_params: expected an object", "sampling_params")
        sf = Fields(sp, "sampling_params.")
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "seed",
                 "sampling_seed", "n"}
        neutral: dict[str, tuple] = {
            "repetition_penalty": (None, 1, 1.0), "frequency_penalty": (None, 0, 0.0),
            "presence_penalty": (None, 0, 0.0), "min_new_tokens": (None, 0), "min_p": (None, 0, 0.0),
            "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
            "no_stop_trim": (None, False), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
        }
        for key in sp:
            if key in neutral:
                sf.unsupported(key, neutral[key])
            elif key not in known:
                raise ApiError(400, f"sampling_params.{key}: unknown sampling parameter",
                               f"sampling_params.{key}", code="unknown_parameter")
        n = sf.int("n", 1, minimum=1)
        if n > MAX_N:
            raise sf.fail("n", f"at most {MAX_N} samples per request, got {n}")
        seed = sf.int("sampling_seed", None)
        req = GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=max_new(sf.int("max_new_tokens", None, minimum=1), 128, len(ids), runner.engine.context_length),
            sampling=sampling_from(sf), stop=sf.stop("stop"), stop_token_ids=sf.int_list("stop_token_ids"),
            ignore_eos=sf.bool("ignore_eos", False), seed=sf.int("seed", seed),
            rid=body.get("rid") if isinstance(body.get("rid"), str) else None,
            logprobs=return_logprob, top_logprobs=top_num if return_logprob else 0,
        )
        if req.stop:
            need_tokenizer()
        validate_request(runner, req, {"prompt": "text" if has_text else "input_ids",
                                       "max_new_tokens": "sampling_params.max_new_tokens"})
        if req.rid is not None and req.rid in runner._sinks:
            raise ApiError(400, f"rid: request id {req.rid!r} is already in flight", "rid")
        stream = f.bool("stream", False)
        choices = _Choices(runner, req, n)

        def result(fin: Finished) -> dict:
            meta = {**fin.meta_info, "cached_tokens": 0}
            if return_logprob:
                meta.update(sglang_logprobs(fin.output_ids, fin.token_logprobs, fin.top_logprobs, texts, with_text))
            return {"text": fin.text, "output_ids": fin.output_ids, "meta_info": meta}

        if stream:
            return _stream(_stream_native(choices, req, result), ignored)
        fins = await choices.results()
        return _json(result(fins[0]) if n == 1 else [{**result(fin), "index": i} for i, fin in enumerate(fins)],
                     ignored)

    async def _stream_native(choices: _Choices, req: GenerationRequest, result) -> AsyncIterator[str]:
        """SGLang's stream: cumulative ``text`` and ``output_ids`` per chunk (with ``index`` when ``n`` > 1)."""
        n = len(choices.rids)
        stream_texts = [StreamText(tok, req.stop) if tok is not None else None for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]

        def indexed(i: int, obj: dict) -> dict:
            return {**obj, "index": i} if n > 1 else obj

        try:
            async for i, event in choices.events():
                if event[0] == "tokens":
                    ids[i].extend(event[1])
                    text = stream_texts[i]
                    if text is not None:
                        text.add(event[1])
                    yield sse(indexed(i, {"text": text.sent if text else "", "output_ids": list(ids[i]),
                                          "meta_info": {"id": choices.rids[i], "finish_reason": None,
                                                        "prompt_tokens": len(req.prompt_ids),
                                                        "completion_tokens": len(ids[i])}}))
                elif event[0] == "done":
                    yield sse(indexed(i, result(event[1])))
                else:
                    yield _stream_error(event)
                    choices.abort_if_running()
                    break
            yield sse("[DONE]")
        finally:
            choices.abort_if_running()

    # ---- info ----------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not runner.alive:
            return PlainTextResponse("engine loop not running", status_code=503)
        if runner.shutting_down:
            return PlainTextResponse("shutting down", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        card = {"id": runner.model_name, "object": "model", "created": int(runner.started_at), "owned_by": "sglang-ext",
                "root": runner.model_name, "max_model_len": runner.engine.context_length}
        return {"object": "list", "data": [card]}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": runner.info.get("model_path", runner.model_name), "tokenizer_path":
                runner.info.get("model_path", runner.model_name), "is_generation": True}

    @app.get("/server_info")
    async def server_info():
        return runner.server_info()

    @app.get("/get_server_info")  # SGLang's deprecated alias
    async def get_server_info():
        return runner.server_info()

    @app.get("/metrics")
    async def metrics():
        runner.refresh_gauges()
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["ApiError", "DEFAULT_MAX_REQUEST_BYTES", "EngineRunner", "Finished", "ServerMetrics", "ServerOptions",
           "create_app"]
