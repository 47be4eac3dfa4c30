"""The `qwen36` command line."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

DEMO_VERSION = 1
DEMO_PROMPT = "The three primary colours are"


def make_demo(out: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint (official layout, real vocabulary, random weights) atomically."""
    from .synth import DEMO, write_checkpoint

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, DEMO, seed=seed, tokenizer=True)
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
    path = make_demo(Path(args.dir), args.seed)
    print(f"wrote a demo checkpoint (random weights, real Qwen3.6 vocabulary) to {path}")
    return 0


def cmd_demo(args) -> int:
    from . import LLM, SamplingParams

    path = demo_checkpoint(args.seed)
    t0 = time.perf_counter()
    llm = LLM(path)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    out = llm.generate(DEMO_PROMPT, params)
    t2 = time.perf_counter()
    cfg = llm.config.text
    print("NOTE: the demo checkpoint has RANDOM weights: the text below is meaningless by design; it shows the "
          "whole path (official-layout checkpoint -> loader -> hybrid DeltaNet/attention MoE model -> tokenizer).")
    print(f"checkpoint: {path}")
    print(f"model: {cfg.num_hidden_layers} layers {''.join('A' if t == 'full_attention' else 'D' for t in cfg.layer_types)}, "
          f"hidden {cfg.hidden_size}, {cfg.num_experts} experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}")
    print(f"prompt: {DEMO_PROMPT!r} ({len(out.prompt_token_ids)} tokens)")
    print(f"greedy continuation ({len(out.token_ids)} tokens, finish_reason={out.finish_reason}): {out.text!r}")
    print(f"load {t1 - t0:.2f} s, generate {t2 - t1:.2f} s")
    return 0


def cmd_generate(args) -> int:
    from . import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    overrides = {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       seed=args.seed, max_tokens=args.max_tokens).items() if v is not None}
    out = llm.generate(args.prompt, llm.default_sampling_params(**overrides))
    print(out.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen36", description="Inference engine for Qwen3.6-35B-A3B (qwen3_5_moe).")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-demo", help="synthesize a small checkpoint in the official layout (real vocabulary)")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_demo)

    d = sub.add_parser("demo", help="make (once, cached) the demo checkpoint and generate from it")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-tokens", type=int, default=24)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="one completion of a prompt, to stdout")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)
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
