"""The `qwen36` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .demo import demo_checkpoint, demo_image, make_demo
from .engine.config import EngineConfig
from .plan import parse_size

DEMO_MESSAGES = [{"role": "user", "content": "Name the three primary colours."}]


def cmd_make_demo(args) -> int:
    path = make_demo(Path(args.dir), args.seed, args.geometry, args.layers, args.quantization, args.dtype,
                     not args.no_mtp)
    print(f"wrote a demo checkpoint (random weights, real Qwen3.6 vocabulary) to {path}")
    return 0


def cmd_demo(args) -> int:
    from . import LLM, SamplingParams

    path = demo_checkpoint(args.seed)
    t0 = time.perf_counter()
    llm = LLM(path)
    t1 = time.perf_counter()
    prompt = llm.encode_chat(DEMO_MESSAGES)
    result = llm.chat(DEMO_MESSAGES, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    t2 = time.perf_counter()
    cfg = llm.config.text
    print("NOTE: the demo checkpoint has RANDOM weights: the text below is meaningless by design; it shows the "
          "whole path (official-layout checkpoint -> loader -> hybrid DeltaNet/attention MoE model -> chat "
          "template -> tokenizer -> reasoning/answer split).")
    print(f"checkpoint: {path}")
    print(f"model: {cfg.num_hidden_layers} layers {''.join('A' if t == 'full_attention' else 'D' for t in cfg.layer_types)}, "
          f"hidden {cfg.hidden_size}, {cfg.num_experts} experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}")
    print(f"user: {DEMO_MESSAGES[0]['content']!r} -> prompt of {len(prompt.ids)} tokens")
    print(f"reasoning_content: {result.reasoning_content!r}")
    print(f"content: {result.content!r}")
    print(f"finish_reason: {result.finish_reason} (greedy, max_tokens={args.max_tokens})")
    print(f"load {t1 - t0:.2f} s, chat turn {t2 - t1:.2f} s")
    if llm.vision is not None:  # a second turn with a picture: preprocessing, the vision tower, mRoPE positions
        messages = [{"role": "user", "content": [{"type": "image", "image": demo_image()},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
        t3 = time.perf_counter()
        inputs = llm.encode_chat(messages)
        result = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=args.max_tokens))
        t4 = time.perf_counter()
        v = llm.config.vision
        print(f"user: [a 96x64 picture] 'What is in this picture?' -> {len(inputs.mm.rows)} vision tokens from a "
              f"{v.depth}-block tower, prompt of {len(inputs.ids)} tokens")
        print(f"answer (raw): {result.text!r}")
        print(f"image turn {t4 - t3:.2f} s")
    return 0


def cmd_generate(args) -> int:
    from .stats import StreamTimer

    llm = _llm(args, max_num_seqs=1)
    if args.verbose:
        print(f"qwen36: {llm.describe()}", file=sys.stderr)
    params = llm.default_sampling_params(**_sampling_overrides(args))
    inputs = llm.encode_prompt(args.prompt)
    timer = StreamTimer(prompt_tokens=len(inputs.ids))
    finish = None
    for out in timer.wrap(llm.generate_stream(inputs, params)):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        finish = out.finish_reason if out.finished else finish
    print()
    if finish == "length":
        print(f"[stopped at --max-tokens {params.max_tokens}]", file=sys.stderr)
    if args.verbose:
        print(timer.line(), file=sys.stderr)
    return 0


def _sampling_overrides(args) -> dict:
    return {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed, max_tokens=args.max_tokens).items() if v is not None}


def cmd_chat(args) -> int:
    from .repl import ChatSession, run_repl

    llm = _llm(args, max_num_seqs=1)
    params = llm.default_sampling_params(**{"max_tokens": 4096, **_sampling_overrides(args)})
    if args.prompt is None or args.verbose:
        print(f"qwen36: {llm.describe()}", file=sys.stderr)
    if args.prompt is None:
        return run_repl(llm, params, thinking=not args.no_think, verbose=args.verbose)
    ChatSession(llm, params, thinking=not args.no_think, verbose=args.verbose).reply(args.prompt)   # one turn
    return 0


def cmd_serve(args) -> int:
    """Bind the port, answer /health 503 while the model loads on a thread, then serve (200)."""
    import json
    import logging
    import threading

    import uvicorn

    from . import LLM
    from .server.app import Booting, ServerConfig, create_app

    try:
        defaults = json.loads(args.default_chat_template_kwargs) if args.default_chat_template_kwargs else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--default-chat-template-kwargs is not valid JSON: {e}") from None
    if defaults is not None and not isinstance(defaults, dict):
        raise ValueError("--default-chat-template-kwargs must be a JSON object")
    engine_config = _engine_config(args)           # every setting checked before the port opens
    path = _resolve(args)
    name = args.served_model_name or _served_name(args.model, path)
    limits = _mm_limits(args.limit_mm_per_prompt)
    config = ServerConfig(name, args.api_key or os.environ.get("QWEN36_API_KEY") or None,
                          parse_size(args.max_body_size), defaults, args.allowed_local_media_path,
                          args.max_image_pixels, args.max_video_pixels, args.background_prefill,
                          limit_images=limits.get("image"), limit_videos=limits.get("video"),
                          max_waiting=args.max_waiting_requests, request_timeout=args.request_timeout,
                          allowed_hosts=tuple(h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()),
                          host=args.host)
    sock = _bind(args.host, args.port)                 # a port in use is said now, not after loading
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("qwen36").setLevel(args.log_level.upper())   # info: a line per request
    boot = Booting()
    from .server.app import header_timeout_protocol
    server = uvicorn.Server(uvicorn.Config(boot, log_level="info" if args.log_level in ("debug", "trace")
                                           else "warning", access_log=args.log_level in ("debug", "trace"),
                                           timeout_graceful_shutdown=5, limit_concurrency=args.limit_concurrency,
                                           http=header_timeout_protocol(args.request_timeout)))
    failed = []

    def load():
        try:
            llm = LLM(path, engine_config, progress=sys.stderr.isatty())
            app = create_app(llm, config)
            llm.warm_up()
            boot.ready(app)
            print(f"qwen36: serving {name} on http://{args.host}:{args.port}/v1 (ready)\n  {llm.describe()}",
                  file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - any failure to load ends the server with its message
            failed.append(e)
            server.should_exit = True

    print(f"qwen36: loading {args.model} ({path}); http://{args.host}:{args.port}/health answers 503 until "
          "the model is ready", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="qwen36-load", daemon=True).start()
    server.run(sockets=[sock])
    if failed:
        raise failed[0]
    return 0


def _mm_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: vLLM's JSON form ('{"image": 8, "video": 1}') or image=8,video=1."""
    import json
    try:
        value = json.loads(text) if text.strip().startswith("{") else \
            {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"--limit-mm-per-prompt: expected e.g. image=8,video=1 or a JSON object, not {text!r}") \
            from None
    bad = {k: v for k, v in value.items() if k not in ("image", "video") or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"--limit-mm-per-prompt: keys are image and video, values whole numbers >= 0; got {bad}")
    return value


def _bind(host: str, port: int):
    """The listening socket uvicorn will serve on; a clear error if the address is taken or not ours."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port, or stop what "
                         "holds it") from None
    sock.set_inheritable(True)
    return sock


def _resolve(args) -> Path:
    from .hub import resolve_model
    return resolve_model(args.model)


def _served_name(model: str, path: Path) -> str:
    from .hub import model_name
    return model_name(model, path)


def _size(value: str | None) -> int | None:
    """A size flag: None for unset or "auto", else bytes."""
    return None if value in (None, "auto") else parse_size(value)


def cmd_quantize(args) -> int:
    from .export import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.quantization, args.group_size)
    print(f"wrote {args.quantization} checkpoint to {out}")
    return 0


def cmd_fuzz(args) -> int:
    import dataclasses
    import json

    from .tools import fuzz

    key = args.api_key or os.environ.get("QWEN36_API_KEY")
    if not (args.soak or args.hostile):
        report = fuzz.run(args.url.rstrip("/"), args.requests, args.seed, key)
        print(f"sent {report.sent} mutated requests; status counts {dict(sorted(report.by_status.items()))}")
        for status, route, body in report.failures:
            print(f"FAIL {status} {route} {body}")
        return 1 if report.failures else 0
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    unknown = sorted(set(classes or ()) - set(fuzz.HOSTILE))
    if unknown:
        raise ValueError(f"--classes: unknown {unknown}; known: {', '.join(fuzz.HOSTILE)}")
    sizes = fuzz.Sizes.full() if args.full_size else fuzz.Sizes()
    if args.slow_bound is not None:
        sizes = dataclasses.replace(sizes, slow_bound_s=args.slow_bound)
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    if args.soak:
        result = fuzz.soak(args.url, args.clients, args.minutes, args.hostile_every, classes, sizes, key, args.pid,
                           args.hang_after, log=log, bound_s=args.hostile_timeout)
        ok = result["verdict"]["pass"]
    else:
        result = fuzz.run_hostile(args.url, classes, sizes, key, args.pid, args.health_bound, log=log,
                                  bound_s=args.hostile_timeout)
        ok = result["pass"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    import json

    if args.agent:
        return _bench_agent(args)
    if args.context or args.kv_error:
        from .tools.bench_context import command
        return command(args)
    if args.serve:
        from .tools.bench_serve import run
        result = run(args.model or str(demo_checkpoint()), args.clients, args.duration, args.max_tokens or 32)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0 if result["errors"] == 0 else 1
    if args.model is None and not args.synthetic:
        raise ValueError("bench needs MODEL, --synthetic, or --serve")
    from .tools.bench import BenchOptions, run_bench

    per_layer = tuple(int(x) for x in args.per_layer.split(",")) if args.per_layer else None
    if per_layer is not None and len(per_layer) != 2:
        raise ValueError(f"--per-layer: expected two depths A,B, not {args.per_layer!r}")
    result = run_bench(BenchOptions(
        model=args.model, layers=args.layers, experts=args.experts,
        quantization=None if args.quantization == "none" else args.quantization, prompt_len=args.prompt_len,
        decode_tokens=args.decode_tokens or 128, max_ram=parse_size(args.max_ram) if args.max_ram else None,
        image=not args.no_image, structured=args.structured, speculative=args.speculative,
        draft_vocab=args.draft_vocab, vs_transformers=args.vs_transformers, vs_llamacpp=args.vs_llamacpp,
        per_layer=per_layer))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _bench_agent(args) -> int:
    """Replay the agent transcript against --url, or against a `qwen36 serve` of MODEL / --synthetic started
    here (with --server-args)."""
    import json
    import shlex

    from .tools import bench_agent
    from .tools.bench_serve import start_server, stop_server

    preserve = {"on": (True,), "off": (False,), "both": (True, False)}[args.preserve_thinking]
    session = (bench_agent.LONG_SESSION if args.long_session else
               {"tasks": args.tasks, "turns_per_task": args.turns_per_task, "file_lines": args.file_lines})
    context = bench_agent.LONG_SESSION_CONTEXT if args.long_session else 32768
    server = None
    url = args.url
    if url is None:
        if args.model is None and not args.synthetic:
            raise ValueError("bench --agent needs --url, MODEL or --synthetic")
        from .tools.checkpoints import synthetic_checkpoint
        model = args.model or str(synthetic_checkpoint(args.layers, None if args.quantization == "none"
                                                       else args.quantization))
        kv = ["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else []
        server, port = start_server(model, ["--max-model-len", str(context), *kv, *shlex.split(args.server_args)])
        url = f"http://127.0.0.1:{port}"
    log = (lambda *a: None) if args.json else print
    try:
        results = bench_agent.run(url, None, preserve, args.idle_tool, args.idle_user, None, session, log=log)
        if server is not None:                           # the server we started: its peak resident memory
            hwm = next(int(line.split()[1]) for line in open(f"/proc/{server.pid}/status")
                       if line.startswith("VmHWM:"))
            results.append({"server_peak_rss_gb": round(hwm / (1 << 20), 2)})
            log(f"server peak RSS {hwm / (1 << 20):.2f} GB")
    finally:
        if server is not None:
            stop_server(server)
    if args.json:
        print(json.dumps(results))
    return 0


def cmd_device_bench(args) -> int:
    import json

    from .tools.device_bench import run

    res = run(args.device, args.dtype, args.dry_run, tuple(p for p in args.parts.split(",") if p),
              graphs=not args.no_graphs, out=args.out)
    print(json.dumps(res, indent=1))
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight form: auto = int4 on a CPU for a bf16/fp32/FP8 checkpoint (converted once into the "
                        "cache), as stored for an int8/int4 one, none (bf16) on a GPU; none = unquantized")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float weights and compute: auto = float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-convert-cache", dest="convert_cache", action="store_false",
                   help="quantize at load every start instead of keeping a converted copy in the cache")
    p.add_argument("--max-ram", default=None, metavar="SIZE",
                   help="keep resident memory under SIZE (e.g. 16G) by reading routed experts from disk as "
                        "needed (quantized weights on disk; slower)")
    p.add_argument("--cpu-experts", default=None, metavar="all|N",
                   help="with a GPU: keep the routed experts of all or the last N layers in CPU memory (int4, "
                        "run by the CPU kernels), the rest on the GPU (llama.cpp's --n-cpu-moe)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with a GPU: replay decode steps as CUDA graphs (batch sizes up to 64)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cached state of earlier prompts' prefixes")
    p.add_argument("--prefix-cache-memory", default="auto", metavar="SIZE",
                   help="memory for prefix-cache state snapshots, e.g. 512M, 4G (auto: 1G, less on a full machine)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                   help="how attention keys and values are stored: float32 is exact, bfloat16 halves it, int8 "
                        "(per-token, per-head scales) quarters it; auto: float32 on a CPU while the full context "
                        "fits the memory left, else the first smaller form that fits (bfloat16 on a GPU)")
    p.add_argument("--yarn", type=float, default=None, metavar="FACTOR",
                   help="YaRN long context: positions stretched FACTOR times past the native 262,144 (4: to "
                        "~1M, 2: ~524K); costs some short-context quality, so use it only for longer contexts")
    p.add_argument("--rope-scaling", default=None, metavar="JSON",
                   help='rope parameters merged into the checkpoint\'s (its rope_theta and M-RoPE keys kept), '
                        'e.g. \'{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}\'')
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding with the checkpoint\'s MTP head, vLLM\'s spelling: '
                        '\'{"method": "mtp", "num_speculative_tokens": 2}\' (same output, more tokens per step)')


def _engine_config(args, **settings) -> EngineConfig:
    """The EngineConfig of a command's flags: each flag is the setting of the same name (--max-num-seqs is
    max_num_seqs), sizes parsed ("4G"), "auto"/"none" as None; `settings` on top."""
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if f.name in vars(args)}
    for name in ("max_ram", "kv_cache_memory", "prefix_cache_memory"):
        if name in values:
            values[name] = _size(values[name])
    if values.get("quantization") == "none":
        values["quantization"] = None
    if "cpu_experts" in values:
        values["cpu_experts"] = _cpu_experts(values["cpu_experts"])
    yarn = getattr(args, "yarn", None)
    if yarn is not None:
        if values.get("rope_scaling") is not None:
            raise SystemExit("qwen36: give --yarn or --rope-scaling, not both (--yarn F is --rope-scaling "
                             '\'{"rope_type": "yarn", "factor": F}\')')
        if not yarn >= 1:
            raise SystemExit(f"qwen36: --yarn {yarn}: the factor must be at least 1 (4 reaches ~1M tokens)")
        values["rope_scaling"] = {"rope_type": "yarn", "factor": yarn}
    return EngineConfig.build(None, **{**values, **settings})


def _llm(args, path: Path | None = None, **settings):
    from . import LLM

    return LLM(path or _resolve(args), _engine_config(args, **settings), progress=sys.stderr.isatty())


def _cpu_experts(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"qwen36: --cpu-experts {value!r}: give 'all' or a number of layers") from None


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_int_in(1), default=None, help="most tokens to generate (reasoning included)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's generation_config.json")
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's generation_config.json")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--verbose", action="store_true",
                   help="print prompt and decode tokens/s and the time to the first token after each answer")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (a bad value is a usage error, before anything loads)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{n} is outside {lo}..{hi if hi is not None else ''}")
        return n
    return parse


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, where it has one worth saying (not None or off)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


MODEL_HELP = ("a checkpoint directory in the Hugging Face layout, or a repo id such as Qwen/Qwen3.6-35B-A3B "
              "(from the local Hugging Face cache, downloaded if the Hub is reachable)")
# flags of other engines a user may type out of habit -> ours
SIMILAR = {"--ctx-size": "--max-model-len", "-c": "--max-model-len", "--n-predict": "--max-tokens",
           "-n": "--max-tokens", "--threads": "(none: PyTorch uses every core; set OMP_NUM_THREADS)",
           "--n-gpu-layers": "--device cuda", "-ngl": "--device cuda", "--parallel": "--max-num-seqs",
           "--model": "MODEL (a positional argument)", "-m": "MODEL (a positional argument)",
           "--gpu-memory-utilization": "--kv-cache-memory", "--num-ctx": "--max-model-len",
           "--rope-scale": "--yarn FACTOR", "--yarn-orig-ctx":
           "--rope-scaling '{\"original_max_position_embeddings\": N}'", "-ctk": "--kv-cache-dtype",
           "-ctv": "--kv-cache-dtype", "--cache-type-k": "--kv-cache-dtype", "--cache-type-v": "--kv-cache-dtype",
           "--hf-overrides": "--rope-scaling JSON (rope parameters) or --yarn FACTOR"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="qwen36", description="Inference engine and server for Qwen3.6-35B-A3B "
                                "(qwen3_5_moe).", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"qwen36 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("chat", help="chat with the model: interactive, or one turn with PROMPT",
                       formatter_class=_Help)
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument("prompt", nargs="?", default=None, help="one message: answer it and exit (else interactive)")
    c.add_argument("--no-think", action="store_true", help="thinking off (in the REPL, /think toggles)")
    _add_sampling_options(c)
    _add_model_options(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI- and Anthropic-compatible HTTP server", formatter_class=_Help)
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; see the "
                                                      "server docs before exposing it)")
    s.add_argument("--port", type=_int_in(1, 65535), default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                                                   "(or set QWEN36_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model id clients see (default: the "
                                                             "checkpoint's name)")
    s.add_argument("--max-model-len", type=_int_in(1), default=None,
                   help="longest context (prompt + output) in tokens (default: what the KV cache holds, up to "
                        "the model's 262,144, or with --yarn F up to F x 262,144)")
    s.add_argument("--max-num-seqs", type=_int_in(1, 1024), default=8, help="sequences decoded together")
    s.add_argument("--max-num-batched-tokens", type=_int_in(16), default=512, metavar="N",
                   help="tokens one step may run (prompt chunks + decodes); while others decode, a step takes at "
                        "most a quarter of it in prompt tokens: lower for steadier token rates beside long "
                        "prompts, higher for faster long prefills")
    s.add_argument("--kv-cache-memory", default="auto", metavar="SIZE",
                   help="memory for attention KV, e.g. 4G (auto: what is left after the weights, the state "
                        "slots, the prefix cache and a margin)")
    s.add_argument("--max-body-size", default="32M", metavar="SIZE",
                   help="largest request body (images come as data: URLs)")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name images/videos as file:// URLs inside DIR (off by default)")
    s.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="cap each image's pixel budget (default: the checkpoint's, 16.8 M for Qwen3.6; the vision "
                        "tower's time grows faster than the pixel count: docs/performance.md)")
    s.add_argument("--max-video-pixels", type=int, default=None, metavar="N",
                   help="cap each video's pixel budget over all its frames")
    s.add_argument("--limit-mm-per-prompt", default="image=32,video=4", metavar="LIMITS",
                   help="most images and videos one request may carry (also a JSON object, as vLLM takes it); "
                        "each is sized from its header and checked against the context before it is decoded")
    s.add_argument("--max-waiting-requests", type=_int_in(0), default=256, metavar="N",
                   help="requests queued behind the running ones before new ones get 429 with Retry-After "
                        "(a completion with n choices or several prompts counts each)")
    s.add_argument("--limit-concurrency", type=_int_in(1), default=512, metavar="N",
                   help="open connections at once; more get 503 (uvicorn's limit)")
    s.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="time allowed to send a request's headers, and again its body; slower clients are cut off")
    s.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names accepted besides localhost/127.0.0.1/::1 when the server has "
                        "no API key and listens on loopback (others get 403: DNS-rebinding protection)")
    s.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                   help='e.g. \'{"enable_thinking": false}\'')
    s.add_argument("--background-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="when idle after a chat answer, prefill the history as the next turn will render it "
                        "(earlier reasoning dropped), so the next user message hits the prefix cache")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="info: one line per request (tokens, cached, time to first token, tok/s); debug: also "
                        "HTTP access lines and cache decisions")
    _add_model_options(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="raw completion of a text prompt (no chat template), to stdout",
                       formatter_class=_Help)
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("prompt", help="the text to continue")
    _add_sampling_options(g)
    _add_model_options(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="make (once, cached) a small random-weight checkpoint and run one chat turn",
                       formatter_class=_Help)
    d.add_argument("--seed", type=int, default=0, help="the demo checkpoint's seed")
    d.add_argument("--max-tokens", type=int, default=24, help="tokens to generate")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="write a quantized checkpoint to OUT (serve and chat keep one in the "
                                        "cache by themselves)", formatter_class=_Help)
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("out", help="the directory to write")
    q.add_argument("--quantization", default="int4", choices=["int8", "int4"])
    q.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dim")
    q.set_defaults(func=cmd_quantize)

    m = sub.add_parser("make-demo", help="[dev] synthesize a random-weight checkpoint in the official layout "
                                         "(real vocabulary)", formatter_class=_Help)
    m.add_argument("dir", help="a new or empty directory (or one make-demo wrote before, which it replaces)")
    m.add_argument("--seed", type=int, default=0, help="random weights' seed")
    m.add_argument("--geometry", default="demo", choices=["demo", "real"],
                   help="real: Qwen3.6-35B-A3B's full geometry, written in quantized form")
    m.add_argument("--layers", type=int, default=None, help="decoder layers (default: the geometry's)")
    m.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="write weights in qwen36's quantized form (--geometry real: int4 unless --dtype)")
    m.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="plain weights in this dtype, written one layer at a time (for --geometry real: what "
                        "llama.cpp's converter reads)")
    m.add_argument("--no-mtp", action="store_true", help="leave out the MTP head (mtp.*)")
    m.set_defaults(func=cmd_make_demo)

    b = sub.add_parser("bench", help="[dev] benchmarks: the model (speed, memory) or a live server (--serve)",
                       formatter_class=_Help)
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--serve", action="store_true", help="load-test a `qwen36 serve` of MODEL (default: the demo)")
    b.add_argument("--clients", type=int, default=8)
    b.add_argument("--duration", type=float, default=30.0)
    b.add_argument("--max-tokens", type=int, default=None)
    b.add_argument("--json", action="store_true")
    b.add_argument("--synthetic", action="store_true", help="a random checkpoint at the real widths (cached)")
    b.add_argument("--layers", type=int, default=40)
    b.add_argument("--experts", type=int, default=256)
    b.add_argument("--quantization", default="int4", choices=["int8", "int4", "none"])
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded (default 128; --context: 32)")
    b.add_argument("--max-ram", default=None, help="as for serve: keep resident memory under SIZE")
    b.add_argument("--no-image", action="store_true", help="skip the 1024x768 image encode timing")
    b.add_argument("--structured", action="store_true",
                   help="also decode with a JSON schema (batch 1 and 8) and time a schema compile")
    b.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="also decode with MTP speculation, K drafts per step: the head's own drafts and oracle "
                        "drafts (all / half / none right), with the estimate at the published acceptance")
    b.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="with --speculative: draft among the first N token ids (speculative_config's "
                        "draft_vocab_size)")
    b.add_argument("--agent", action="store_true",
                   help="replay a coding-agent session (see qwen36/tools/bench_agent.py) against --url or a "
                        "server started here")
    b.add_argument("--url", default=None, help="--agent: an OpenAI-compatible server (ours, llama.cpp's, ...)")
    b.add_argument("--preserve-thinking", default="both", choices=["on", "off", "both"])
    b.add_argument("--idle-tool", type=float, default=0.0, help="--agent: seconds idle after each tool result")
    b.add_argument("--idle-user", type=float, default=0.0, help="--agent: seconds idle before each new task")
    b.add_argument("--tasks", type=int, default=3)
    b.add_argument("--turns-per-task", type=int, default=4)
    b.add_argument("--file-lines", type=int, default=120, help="--agent: lines of each file a tool returns")
    b.add_argument("--long-session", action="store_true",
                   help="--agent: the long-context preset (6 tasks x 6 requests, 320-line files: the last prompt "
                        "past 100K tokens), a started server with --max-model-len 131072")
    b.add_argument("--server-args", default="", help="--agent: extra `qwen36 serve` options, e.g. "
                                                     "'--no-enable-prefix-caching'")
    b.add_argument("--per-layer", default=None, metavar="A,B",
                   help="a decode layer's cost: synthetic checkpoints of A and B layers alternated, ms per layer "
                        "against its weights' read time at the bandwidth measured in the same run")
    b.add_argument("--vs-llamacpp", default=None, metavar="GGUF",
                   help="also run llama.cpp's llama-bench on GGUF (the same geometry and layers, e.g. made with "
                        "make-demo --dtype bfloat16 and llama.cpp's convert_hf_to_gguf.py) and print both")
    b.add_argument("--vs-transformers", action="store_true",
                   help="also time HF transformers and our fp32 path on the same (unquantized) checkpoint")
    b.add_argument("--context", default=None, metavar="DEPTHS",
                   help="long context, e.g. 8K,32K,128K: prefill to each depth (--prompt-len P: the rate of its last "
                        "P tokens) and decode --decode-tokens after it; with --vs-llamacpp GGUF, ours and "
                        "llama-bench -d DEPTH alternated, each a fresh process (tools/bench_context.py)")
    b.add_argument("--filled", action="store_true",
                   help="--context: decode at depth only, the KV cache and states filled with random values (no "
                        "prefill): 128K in seconds")
    b.add_argument("--kv-cache-dtype", default=None, choices=["auto", "float32", "bfloat16", "int8"],
                   help="--context: the KV cache's storage (default int8); --agent: the started server's")
    b.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="--context: tokens per engine step (default: the engine's)")
    b.add_argument("--rounds", type=int, default=2, help="--context --vs-llamacpp: interleaved rounds")
    b.add_argument("--out", default=None, metavar="FILE",
                   help="--context --vs-llamacpp: write every round's figures and commands here (JSON)")
    b.add_argument("--kv-error", default=None, metavar="DEPTHS",
                   help="KV-cache error, e.g. 8K,32K: logits of a prompt's last 64 positions with bf16 and int8 KV "
                        "against fp32 KV (KL, top-1); with --vs-llamacpp GGUF also llama-perplexity's KL of q8_0 "
                        "against f16 KV")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("device-bench", formatter_class=_Help, help="[dev] GPU benchmarks at the real geometry, random weights made on the "
                                            "device (decode, throughput, 8K prefill, expert offload)")
    v.add_argument("--device", default="cuda")
    v.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    v.add_argument("--dry-run", action="store_true", help="the same code on a tiny geometry (e.g. on the CPU)")
    v.add_argument("--parts", default="", help="comma-separated subset of decode_b1,throughput,prefill_8k,offload_b1")
    v.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    v.add_argument("--out", default=None, help="also write the results as JSON here")
    v.set_defaults(func=cmd_device_bench)

    f = sub.add_parser("fuzz", help="[dev] mutated and hostile requests, or a soak, against a running server; "
                                    "fails on any 5xx", formatter_class=_Help)
    f.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    f.add_argument("--requests", type=int, default=500, help="mutated requests (without --hostile / --soak)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--api-key", default=None, help="default: $QWEN36_API_KEY")
    f.add_argument("--hostile", action="store_true",
                   help="send every hostile class once (media blow-up, ffmpeg data URLs, amplification, huge "
                        "lists, malformed JSON and schemas, metrics injection, foreign Host / content type, "
                        "disconnects, slowloris); JSON report per class")
    f.add_argument("--soak", action="store_true",
                   help="--clients normal clients for --minutes: the first half alone, the second with hostile "
                        "requests mixed in; passes on no 5xx, no hang, p99 within 2x, RSS flat")
    f.add_argument("--clients", type=_int_in(1), default=4, help="soak: concurrent normal clients")
    f.add_argument("--minutes", type=float, default=2.0, help="soak: total length (two equal phases)")
    f.add_argument("--hostile-every", type=float, default=2.0, metavar="S",
                   help="soak: one hostile request every S seconds in the second phase")
    f.add_argument("--classes", default=None, help="comma-separated hostile classes (default: all)")
    f.add_argument("--full-size", action="store_true",
                   help="the audit's payload sizes (an unpatched server may need tens of GB); default: small")
    f.add_argument("--pid", type=int, default=None,
                   help="the server's process id: RSS from /proc/PID/status (else process_resident_memory_bytes "
                        "from /metrics)")
    f.add_argument("--hang-after", type=float, default=30.0, metavar="S",
                   help="soak: a normal request slower than this counts as a hang")
    f.add_argument("--hostile-timeout", type=float, default=None, metavar="S",
                   help="every hostile request must be answered within S (default: per class, 5-60 s)")
    f.add_argument("--health-bound", type=float, default=2.0, metavar="S",
                   help="--hostile: /health slower than this while a class runs is a failure")
    f.add_argument("--slow-bound", type=float, default=None, metavar="S",
                   help="slowloris: the server must close a trickling connection within S (default 75, above "
                        "serve's 60 s --request-timeout)")
    f.add_argument("--json", default=None, metavar="FILE", help="also write the JSON report here")
    f.set_defaults(func=cmd_fuzz)
    return p


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .tokenizer import TokenizerError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser._subparsers._group_actions[0].choices[args.command]   # the subcommand's own usage line
        hints = [f"{x} -> {SIMILAR[x]}" for x in extra if x.split("=")[0] in SIMILAR]
        if not hints:
            import difflib
            flags = [o for a in sub._actions for o in a.option_strings]
            hints = [f"{x} -> {m[0]}?" for x in extra if (m := difflib.get_close_matches(x.split("=")[0], flags, 1))]
        sub.error(f"unrecognized arguments: {' '.join(extra)}"
                  + (f" (did you mean: {'; '.join(hints)})" if hints else ""))
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"qwen36: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
