"""``sglang-ext serve`` (an OpenAI/SGLang-compatible HTTP server) and ``sglang-ext generate`` (one-shot batch).

Both take the engine flags of :mod:`sglang_ext.engine.launch` (SGLang's names), so the same launch line
serves over HTTP or runs a prompt file offline with identical speculative settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from sglang_ext.engine.launch import LaunchError, add_engine_args, build_engine, int_at_least


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _print_notes(info: dict) -> None:
    for note in info.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)


def _non_negative_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a number of seconds") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be a finite number >= 0")
        return value
    return parse


def register(subparsers) -> None:
    """Add ``serve`` and ``generate`` to the top-level ``sglang-ext`` parser's subparsers."""
    serve = subparsers.add_parser("serve", help="OpenAI- and SGLang-compatible HTTP server on the reference engine",
                                  description="Serve /v1/completions, /v1/chat/completions, /generate, /health, "
                                              "/v1/models, /server_info and /metrics.")
    add_engine_args(serve)
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, like SGLang)")
    net.add_argument("--port", type=int, default=30000, help="port (default 30000, like SGLang)")
    net.add_argument("--served-model-name", metavar="NAME", help="model name in responses and /v1/models (default: --model-path)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                     help="log level of the server and uvicorn (default info)")
    net.add_argument("--max-request-bytes", type=int_at_least(1), default=None, metavar="N",
                     help="largest request body accepted; a bigger one gets a 413 before it is read "
                          "(default 8 MiB)")
    net.add_argument("--shutdown-timeout", type=_non_negative_float("--shutdown-timeout"), default=30.0,
                     metavar="SECONDS",
                     help="on SIGTERM/SIGINT, requests in flight get this long to finish; then each is aborted with "
                          "a 503 (a stream gets an error chunk and [DONE]) and the server exits (default 30)")
    net.add_argument("--reject-unknown-fields", action="store_true",
                     help="answer a request field this server does not know with a 400 naming it (default: serve it, "
                          "log a warning and list the ignored fields in the X-Ignored-Fields response header)")
    serve.set_defaults(func=cmd_serve)

    gen = subparsers.add_parser("generate", help="one-shot generation for prompts with the reference engine",
                                description="Run prompts through the engine (batched up to --max-running-requests) "
                                            "and print each text with SGLang's meta_info.")
    add_engine_args(gen)
    g = gen.add_argument_group("prompts and sampling")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", metavar="FILE", help="JSONL prompts (`sglang-ext data` format, Spec-Bench/MT-Bench turns, or prompt)")
    g.add_argument("--limit", type=int, metavar="N", help="use at most this many prompts from --prompts-file")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="new tokens per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy, reproducible)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1 disables top-k")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt in the tokenizer's chat template (default: on)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout (text, output_ids, meta_info)")
    gen.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from .app import DEFAULT_MAX_REQUEST_BYTES, EngineRunner, ServerOptions, create_app
        from .graceful import GracefulServer
    except ImportError as e:
        return _error(f"serve needs fastapi, uvicorn and prometheus_client ({e}); pip install -e '.[sglang]'")
    try:
        engine, tokenizer, info = build_engine(args)
    except LaunchError as e:
        return _error(str(e))
    _print_notes(info)
    name = args.served_model_name or info["served_model_name"]
    runner = EngineRunner(engine, tokenizer, model_name=name, info=info, random_seed=args.random_seed)
    spec = info.get("speculative_algorithm") or "NONE"
    print(f"serving {name} on http://{args.host}:{args.port} (speculative {spec}, steps "
          f"{info.get('speculative_num_steps')}, topk {info.get('speculative_eagle_topk')}, max batch "
          f"{info['max_running_requests']}, context {info['context_length']}; model loaded in {info['load_seconds']} s)",
          file=sys.stderr)
    options = ServerOptions(max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                            reject_unknown_fields=args.reject_unknown_fields)
    config = uvicorn.Config(create_app(runner, options), host=args.host, port=args.port, log_level=args.log_level)
    GracefulServer(config, runner, args.shutdown_timeout).run()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sglang_ext.core.processing import SamplingParams
    from sglang_ext.engine.engine import GenerationRequest, RequestError

    if args.max_new_tokens < 1:
        return _error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    except ValueError as e:
        flag = "--temperature" if "temperature" in str(e) else "--top-p"
        return _error(f"{flag}: {e}")
    prompts: list[tuple[str, str]] = [(f"prompt-{i}", text) for i, text in enumerate(args.prompt)]
    if args.prompts_file:
        from sglang_ext.data.prompts import PromptFileError, load_prompts

        try:
            prompts += [(p.id, p.text) for p in load_prompts(args.prompts_file, limit=args.limit)]
        except PromptFileError as e:
            return _error(f"--prompts-file: {e}")
    if not prompts:
        return _error("give at least one --prompt TEXT or a --prompts-file FILE")
    try:
        engine, tokenizer, info = build_engine(args)
    except LaunchError as e:
        return _error(str(e))
    _print_notes(info)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        return _error("--chat: the model's tokenizer has no chat template; use --no-chat")
    from sglang_ext.models.chat import encode_chat

    requests = []
    for i, (pid, text) in enumerate(prompts):
        ids = encode_chat(tokenizer, text) if args.chat else [int(t) for t in tokenizer.encode(text)]
        seed = args.random_seed + i if args.random_seed is not None else None
        req = GenerationRequest(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=seed, rid=pid)
        try:
            engine.validate(req)
        except RequestError as e:
            return _error(f"{pid}: {e} (see --max-new-tokens / --context-length)")
        requests.append(req)
    t0 = time.perf_counter()
    states = engine.run(requests)
    seconds = time.perf_counter() - t0
    for (pid, text), state in zip(prompts, states):
        meta = state.meta_info()
        if args.json:
            print(json.dumps({"id": pid, "prompt": text, "text": state.text, "output_ids": state.output_ids,
                              "meta_info": meta}), flush=True)
        else:
            print(f"=== {pid}: {text[:70]!r}")
            print(state.text)
            fields = ["completion_tokens", "spec_verify_ct", "spec_accept_length", "spec_accept_rate", "e2e_latency"]
            shown = ", ".join(f"{k}={meta[k]:.3g}" if isinstance(meta[k], float) else f"{k}={meta[k]}"
                              for k in fields if k in meta)
            print(f"--- meta_info: {shown}, finish_reason={meta['finish_reason']}\n")
    tokens = sum(len(s.output_ids) for s in states)
    verify = sum(s.spec_verify_ct for s in states)
    accept = f", accept length {tokens / verify:.2f}" if verify else ""
    print(f"{len(states)} prompt(s), {tokens} tokens in {seconds:.2f} s ({tokens / seconds if seconds else 0:.1f} tok/s), "
          f"speculative {info.get('speculative_algorithm') or 'NONE'}{accept}", file=sys.stderr)
    return 0


__all__ = ["cmd_generate", "cmd_serve", "register"]
