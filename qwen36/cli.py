"""The `qwen36` command line."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

DEMO_VERSION = 3  # bumped when the demo checkpoint's files change (v3: preprocessor configs)
DEMO_MESSAGES = [{"role": "user", "content": "Name the three primary colours."}]


def make_demo(out: Path, seed: int = 0, geometry: str = "demo", layers: int | None = None,
              quantization: str | None = None, dtype: str | None = None, mtp: bool = True) -> Path:
    """Write a demo checkpoint (official layout, real vocabulary, random weights) atomically. The "real"
    geometry is Qwen3.6-35B-A3B's, written directly in quantized form (int4 unless told otherwise), or with
    dtype="bfloat16" as plain bf16 tensors one layer at a time (what llama.cpp's converter reads)."""
    import torch

    from .synth import DEMO, REAL, write_checkpoint

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    geo = dict(REAL if geometry == "real" else DEMO)
    if layers:
        geo["num_hidden_layers"] = layers
    if dtype is not None and quantization is not None:
        raise ValueError("give --dtype or --quantization, not both")
    if geometry == "real" and dtype is None:
        quantization = quantization or "int4"
    write_checkpoint(tmp, geo, seed=seed, tokenizer=True, quantization=quantization, mtp=mtp,
                     shards=2 if quantization is None else 1, streamed=dtype is not None,
                     dtype={"bfloat16": torch.bfloat16, "float32": torch.float32, None: torch.bfloat16}[dtype])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def demo_checkpoint(seed: int = 0) -> Path:
    """The cached demo checkpoint, made on first use."""
    from .paths import cache_dir

    path = cache_dir() / f"demo-v{DEMO_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        print(f"making the demo checkpoint in {path} (once) ...", file=sys.stderr)
        make_demo(path, seed)
    return path


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


def demo_image():
    """A small synthetic picture for the demo: a sky-to-grass gradient with a sun."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64))
    draw = ImageDraw.Draw(img)
    for y in range(64):
        draw.line([(0, y), (95, y)], fill=(90, 160, 230) if y < 40 else (70, 150, 60))
    draw.ellipse([66, 6, 86, 26], fill=(250, 210, 40))
    return img


def cmd_generate(args) -> int:
    from . import LLM, SamplingParams

    llm = _llm(args)
    out = llm.generate(args.prompt, llm.default_sampling_params(**_sampling_overrides(args)))
    print(out.text)
    return 0


def _sampling_overrides(args) -> dict:
    return {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed, max_tokens=args.max_tokens).items() if v is not None}


def cmd_chat(args) -> int:
    from . import LLM
    from .repl import run_repl

    llm = _llm(args)
    params = llm.default_sampling_params(**{"max_tokens": 2048, **_sampling_overrides(args)})
    return run_repl(llm, params, thinking=not args.no_think)


def cmd_serve(args) -> int:
    import json
    import logging
    import os

    import uvicorn

    from . import LLM
    from .server.app import ServerConfig, create_app

    try:
        defaults = json.loads(args.default_chat_template_kwargs) if args.default_chat_template_kwargs else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--default-chat-template-kwargs is not valid JSON: {e}") from None
    if defaults is not None and not isinstance(defaults, dict):
        raise ValueError("--default-chat-template-kwargs must be a JSON object")
    llm = _llm(args, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               kv_cache_bytes=parse_size(args.kv_cache_memory))
    name = args.served_model_name or Path(args.model).resolve().name
    config = ServerConfig(name, args.api_key or os.environ.get("QWEN36_API_KEY") or None,
                          parse_size(args.max_body_size), defaults, args.allowed_local_media_path,
                          args.max_image_pixels, args.max_video_pixels, args.background_prefill)
    app = create_app(llm, config)
    llm.warm_up()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("qwen36").setLevel(args.log_level.upper())     # debug: a line per request (cache hits)
    print(f"qwen36: serving {name} on http://{args.host}:{args.port}/v1 "
          f"(max context {llm.engine().max_model_len} tokens, {args.max_num_seqs} sequences)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


def cmd_quantize(args) -> int:
    from .export import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.quantization, args.group_size)
    print(f"wrote {args.quantization} checkpoint to {out}")
    return 0


def cmd_fuzz(args) -> int:
    from .fuzz import run

    report = run(args.url.rstrip("/"), args.requests, args.seed, args.api_key or os.environ.get("QWEN36_API_KEY"))
    print(f"sent {report.sent} mutated requests; status counts {dict(sorted(report.by_status.items()))}")
    for status, route, body in report.failures:
        print(f"FAIL {status} {route} {body}")
    return 1 if report.failures else 0


def cmd_bench(args) -> int:
    import json

    if args.agent:
        return _bench_agent(args)
    if args.serve:
        from .bench_serve import run
        result = run(args.model or str(demo_checkpoint()), args.clients, args.duration, args.max_tokens or 32)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0 if result["errors"] == 0 else 1
    if args.model is None and not args.synthetic:
        raise ValueError("bench needs MODEL, --synthetic, or --serve")
    from .bench import run_bench
    return run_bench(args)


def _bench_agent(args) -> int:
    """Replay the agent transcript against --url, or against a `qwen36 serve` of MODEL / --synthetic started
    here (with --server-args)."""
    import json
    import shlex

    from . import bench_agent
    from .bench_serve import start_server, stop_server

    preserve = {"on": (True,), "off": (False,), "both": (True, False)}[args.preserve_thinking]
    session = {"tasks": args.tasks, "turns_per_task": args.turns_per_task, "file_lines": args.file_lines}
    server = None
    url = args.url
    if url is None:
        if args.model is None and not args.synthetic:
            raise ValueError("bench --agent needs --url, MODEL or --synthetic")
        from .bench import synthetic_checkpoint
        model = args.model or str(synthetic_checkpoint(args.layers, None if args.quantization == "none"
                                                       else args.quantization))
        server, port = start_server(model, ["--max-model-len", "32768", *shlex.split(args.server_args)])
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

    from .device_bench import run

    res = run(args.device, args.dtype, args.dry_run, tuple(p for p in args.parts.split(",") if p),
              graphs=not args.no_graphs, out=args.out)
    print(json.dumps(res, indent=1))
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--cpu-experts", default=None, metavar="all|N",
                   help="with a GPU: keep the routed experts of all or the last N layers in CPU memory (int4, "
                        "run by the CPU kernels), the rest on the GPU (llama.cpp's --n-cpu-moe)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with a GPU: replay decode steps as CUDA graphs (batch sizes up to 64)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"])
    p.add_argument("--max-ram", default=None, help="keep resident memory under SIZE (e.g. 8G) by letting "
                                                 "least recently used experts leave memory (quantized checkpoints)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cached state of earlier prompts' prefixes (on by default)")
    p.add_argument("--prefix-cache-memory", default="1G",
                   help="memory for prefix-cache state snapshots, e.g. 512M, 4G (cached KV stays in the KV cache)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding with the checkpoint\'s MTP head, vLLM\'s spelling: '
                        '\'{"method": "mtp", "num_speculative_tokens": 2}\' (same output, more tokens per step)')


def _llm(args, **kw):
    from . import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
               max_ram=parse_size(args.max_ram) if args.max_ram else None,
               enable_prefix_caching=args.enable_prefix_caching,
               prefix_cache_memory=parse_size(args.prefix_cache_memory),
               speculative_config=args.speculative_config, cpu_experts=_cpu_experts(args.cpu_experts),
               cuda_graphs=args.cuda_graphs, **kw)


def _cpu_experts(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"qwen36: --cpu-experts {value!r}: give 'all' or a number of layers") from None


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen36", description="Inference engine for Qwen3.6-35B-A3B (qwen3_5_moe).")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-demo", help="synthesize a small checkpoint in the official layout (real vocabulary)")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--geometry", default="demo", choices=["demo", "real"],
                   help="real: Qwen3.6-35B-A3B's full geometry, written in quantized form")
    m.add_argument("--layers", type=int, default=None)
    m.add_argument("--quantization", default=None, choices=["int8", "int4"])
    m.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="plain weights in this dtype, written one layer at a time (for --geometry real: what "
                        "llama.cpp's converter reads)")
    m.add_argument("--no-mtp", action="store_true", help="leave out the MTP head (mtp.*)")
    m.set_defaults(func=cmd_make_demo)

    d = sub.add_parser("demo", help="make (once, cached) the demo checkpoint and generate from it")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-tokens", type=int, default=24)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="one completion of a prompt, to stdout")
    g.add_argument("model")
    g.add_argument("prompt")
    _add_sampling_options(g)
    _add_model_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat: streaming, reasoning shown apart")
    c.add_argument("model")
    c.add_argument("--no-think", action="store_true", help="start with thinking off (/think on|off toggles)")
    _add_sampling_options(c)
    _add_model_options(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set QWEN36_API_KEY)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-model-len", type=int, default=32768)
    s.add_argument("--max-num-seqs", type=int, default=8)
    s.add_argument("--kv-cache-memory", default="1G", help="memory for attention KV blocks, e.g. 512M, 4G")
    s.add_argument("--max-body-size", default="32M", help="largest request body (images come as data: URLs)")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name images/videos as file:// URLs inside DIR (off by default)")
    s.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="cap each image's pixel budget (default: the checkpoint's, 16.8 M for Qwen3.6; on a "
                        "2-core CPU the full tower takes ~25 s for 1024x768 and grows faster than the pixel count)")
    s.add_argument("--max-video-pixels", type=int, default=None, metavar="N",
                   help="cap each video's pixel budget over all its frames")
    s.add_argument("--default-chat-template-kwargs", default=None,
                   help='JSON, e.g. \'{"enable_thinking": false}\'')
    s.add_argument("--background-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="when idle after a chat answer, prefill the history as the next turn will render it "
                        "(earlier reasoning dropped), so the next user message hits the prefix cache")
    s.add_argument("--log-level", default="warning")
    _add_model_options(s)
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="write a quantized checkpoint that loads without re-quantizing")
    q.add_argument("model")
    q.add_argument("out")
    q.add_argument("--quantization", default="int4", choices=["int8", "int4"])
    q.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dim")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("bench", help="benchmarks: the model (speed, memory) or a live server (--serve)")
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
    b.add_argument("--decode-tokens", type=int, default=128)
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
                   help="replay a coding-agent session (see bench_agent.py) against --url or a server started here")
    b.add_argument("--url", default=None, help="--agent: an OpenAI-compatible server (ours, llama.cpp's, ...)")
    b.add_argument("--preserve-thinking", default="both", choices=["on", "off", "both"])
    b.add_argument("--idle-tool", type=float, default=0.0, help="--agent: seconds idle after each tool result")
    b.add_argument("--idle-user", type=float, default=0.0, help="--agent: seconds idle before each new task")
    b.add_argument("--tasks", type=int, default=3)
    b.add_argument("--turns-per-task", type=int, default=4)
    b.add_argument("--file-lines", type=int, default=120, help="--agent: lines of each file a tool returns")
    b.add_argument("--server-args", default="", help="--agent: extra `qwen36 serve` options, e.g. "
                                                     "'--no-enable-prefix-caching'")
    b.add_argument("--per-layer", default=None, metavar="A,B",
                   help="a decode layer's cost: synthetic checkpoints of A and B layers alternated, ms per layer "
                        "against its weights' read time at the bandwidth measured in the same run")
    b.add_argument("--vs-llamacpp", default=None, metavar="GGUF",
                   help="also run llama.cpp's llama-bench on GGUF (the same geometry and layers, e.g. made with "
                        "make-demo --dtype bfloat16 and shared/tools/llamacpp-anchor.sh gguf) and print both")
    b.add_argument("--vs-transformers", action="store_true",
                   help="also time HF transformers and our fp32 path on the same (unquantized) checkpoint")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("device-bench", help="GPU benchmarks at the real geometry, random weights made on the "
                                            "device (decode, throughput, 8K prefill, expert offload)")
    v.add_argument("--device", default="cuda")
    v.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    v.add_argument("--dry-run", action="store_true", help="the same code on a tiny geometry (e.g. on the CPU)")
    v.add_argument("--parts", default="", help="comma-separated subset of decode_b1,throughput,prefill_8k,offload_b1")
    v.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    v.add_argument("--out", default=None, help="also write the results as JSON here")
    v.set_defaults(func=cmd_device_bench)

    f = sub.add_parser("fuzz", help="send mutated requests to a running server; fails on any 5xx")
    f.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    f.add_argument("--requests", type=int, default=500)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--api-key", default=None, help="default: $QWEN36_API_KEY")
    f.set_defaults(func=cmd_fuzz)
    return p


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"qwen36: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
