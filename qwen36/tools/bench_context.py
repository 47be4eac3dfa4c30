"""`qwen36 bench --context 8K,32K,128K` and `--kv-error 8K,32K`: the engine at depth, side by side with llama.cpp.

- `depth_bench`: for each depth D, a random prompt of D tokens through the engine as it runs one request
  (chunked prefill, max_num_batched_tokens per step): the time to its first token (prefill to depth), the rate
  of its last P prompt tokens (the step times), then N greedy tokens decoded after it; the KV cache it holds,
  peak RSS. After it, and alone with `filled=True`, decode at depth without a prefill: the KV rows of positions
  0..D-1 and the DeltaNet states filled with random values, then N greedy steps of the model forward the engine
  runs (attention reads the same bytes whatever they hold): decode at 128K in seconds, labelled so.
- `drive`: the side-by-side. Ours (`python -m qwen36 bench ... --context D --json`) and llama.cpp's
  `llama-bench -fa 1 -ctk q8_0 -ctv q8_0 -d D -p P -n N` each run as a fresh subprocess, alternated per depth
  for R rounds, from a parent that holds no model, no torch and no threads: the CLI replaces itself (exec) with
  this file run as a plain script, which imports nothing but the standard library.
- `kv_error`: the logits of the last 64 positions of a D-token prompt (decoded one at a time, teacher-forced,
  each reading the whole cache) with bf16 and int8 KV against fp32 KV, the same weights: KL(fp32 || other)
  mean and max, top-1 agreement. Beside it llama.cpp's own KV error (`llama-perplexity --kl-divergence` with
  q8_0 KV against a base run with f16 KV).

Only the standard library is imported at the top (the driver runs this file as a script); the engine's modules
are imported inside the functions that measure.
"""
from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILLED_NOTE = ("decode at depth with a filled cache: KV rows of positions 0..D-1 and the DeltaNet states set to "
               "random values (no prefill), then greedy steps of the engine's model forward")
KV_ERROR_NOTE = ("qwen36: logits of the last {last} positions of a {depth}-token random prompt (decoded one at a "
                 "time, teacher-forced, each reading the whole cache) with {other} KV against float32 KV, same "
                 "weights; KL(float32 || {other}) in nats, top-1: same argmax")
LLAMA_KL_NOTE = ("llama.cpp: llama-perplexity --kl-divergence with q8_0 K and V against a base run with f16 K "
                 "and V (its default), flash attention on, one chunk of c={ctx} tokens of random words: "
                 "KL(f16 || q8_0) over the chunk's second half (positions {first}..{end}), batch {batch}")
FLOOR_NOTE = ("llama.cpp: the same f16 KV run against its own base: zero but for the base file's 16-bit "
              "log-probabilities, the floor under its q8_0 figure")
WARM_STEPS = 2             # decode steps run before the timed ones in filled mode (the decode plan is built)


def parse_depths(text: str) -> list[int]:
    """'8K,32K,128K' -> [8192, 32768, 131072]: comma-separated token counts, K = 1024, M = 1024 * 1024."""
    depths = []
    for item in str(text).split(","):
        t = item.strip().upper()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KM]?)", t)
        if not m:
            raise ValueError(f"not a depth: {item.strip()!r} in {text!r} (use e.g. 8K,32K,128K or 4096)")
        n = float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20}[m.group(2)]
        if n != int(n) or n < 1:
            raise ValueError(f"not a whole, positive number of tokens: {item.strip()!r} in {text!r}")
        depths.append(int(n))
    return depths


def label(depth: int) -> str:
    """8192 -> '8K', 1000 -> '1000'."""
    return f"{depth >> 10}K" if depth % 1024 == 0 else str(depth)


def cpu_model() -> str:
    """lscpu's model name (else /proc/cpuinfo's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def threads() -> int:
    return len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------------ ours, at depth
def _random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(min(vocab, 200000)) for _ in range(n)]


def load(model: str | None, layers: int, quantization: str | None, max_model_len: int, kv_cache_dtype: str,
         max_num_batched_tokens: int | None = None, **settings):
    """An LLM for one sequence of up to max_model_len tokens, on `model` or the cached synthetic checkpoint of
    `layers` layers (stored int4 / int8 / bf16 as quantization says); (llm, seconds)."""
    from ..llm import LLM
    from .checkpoints import synthetic_checkpoint
    from .measure import timed

    path = Path(model) if model else synthetic_checkpoint(layers, quantization)
    if max_num_batched_tokens:
        settings["max_num_batched_tokens"] = max_num_batched_tokens
    return timed(lambda: LLM(path, quantization=quantization if model else None, kv_cache_dtype=kv_cache_dtype,
                             max_model_len=max_model_len, max_num_seqs=1, **settings))


def kv_storage(llm) -> str:
    """The dtype the engine's KV rows are stored in (what the cache holds, not what was asked)."""
    for tensors in llm.engine().cache.layers.values():
        if "k" in tensors:
            return str(tensors["k"].dtype).removeprefix("torch.")
    return "none"


def prefill_and_decode(llm, prompt: list[int], n: int, window: int) -> dict:
    """One request through the engine: `prompt`, then n greedy tokens. The time to the first token (prefill to
    depth), the rate of the prompt's last `window` tokens (from the engine's step times: the steps that ran
    them), and the decode rate of the n tokens after the first."""
    from ..sampling import SamplingParams

    engine = llm.engine()
    depth = len(prompt)
    base = engine.stats.prompt_tokens_computed
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    marks = [(time.perf_counter(), 0, 0)]              # (time, prompt tokens computed, tokens out) after each step
    produced, done = 0, False
    while not done:
        outs = engine.step()
        for o in outs:
            if o.request_id == rid:
                if o.finish_reason == "error":
                    raise RuntimeError(f"the request failed in the engine at step {len(marks)}")
                produced += len(o.token_ids)
                done = done or o.finished
        marks.append((time.perf_counter(), engine.stats.prompt_tokens_computed - base, produced))
    t0 = marks[0][0]
    first = next(m for m in marks if m[2] >= 1)
    # the last step boundary at or before depth - window prompt tokens: the steps after it ran the window
    start = max((m for m in marks if m[1] <= max(0, depth - window) and m[0] <= first[0]), key=lambda m: m[0])
    last = marks[-1]
    return {"prefill_s": round(first[0] - t0, 3), "prefill_tok_s": round(depth / (first[0] - t0), 2),
            "prefill_last_tokens": depth - start[1],
            "prefill_tok_s_last": round((depth - start[1]) / (first[0] - start[0]), 2),
            "prefill_steps": sum(1 for a, b in zip(marks, marks[1:]) if b[1] > a[1]),
            "decode_tokens": last[2] - 1, "decode_tok_s": round((last[2] - 1) / (last[0] - first[0]), 2)}


def block_table(llm, length: int) -> list[int]:
    """Blocks 0, 1, ... of the engine's cache covering positions 0..length-1 (row = position): the table
    `fill_random` and `decode_at_depth` use for sequence slot 0, outside the scheduler."""
    cache = llm.engine().cache
    n = -(-length // cache.block_size)
    if n > cache.num_blocks:
        raise ValueError(f"{length} positions: the KV cache has {cache.num_blocks} blocks of {cache.block_size}")
    return list(range(n))


def fill_random(llm, depth: int, seed: int = 0) -> None:
    """Sequence slot 0 of the engine's cache as if a prompt of `depth` tokens had run: the KV rows of positions
    0..depth-1 (blocks 0, 1, ...: `block_table`) and the slot's DeltaNet conv and recurrent states set to random
    values of a plausible size (int8 rows: random codes, scales ~ absmax/127 of unit-normal rows)."""
    import torch

    engine = llm.engine()
    if engine.requests:
        raise RuntimeError("fill_random writes over the engine's cache: no request may be running")
    cache = engine.cache
    block_table(llm, depth)                                          # the rows exist
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for tensors in cache.layers.values():
            for name, t in tensors.items():
                if name in ("k", "v"):
                    rows = t[:depth]
                    if rows.dtype == torch.int8:
                        rows.random_(-127, 128, generator=g)
                    else:
                        rows.normal_(0.0, 1.0, generator=g)
                elif name in ("k_scale", "v_scale"):
                    t[:depth].uniform_(0.015, 0.03, generator=g)
                elif name == "state":
                    t[0].normal_(0.0, 0.02, generator=g)
                elif name == "conv":
                    t[0].normal_(0.0, 0.1, generator=g)


def decode_at_depth(llm, depth: int, first_token: int, n: int, warm: int = WARM_STEPS):
    """Greedy decode from position `depth` in sequence slot 0 of the engine's cache (whatever it holds: a
    prefill's rows or `fill_random`'s; blocks as `block_table`), one token per step through the model forward
    the engine's runner calls (ForwardBatch of one decoding sequence); the first `warm` steps untimed.
    (the n timed tokens, tok/s)."""
    import torch

    from ..batch import ForwardBatch

    model, cache = llm.model, llm.engine().cache
    model.backend.prepare_thread()
    device = model.embed_tokens.weight.device
    blocks = block_table(llm, depth + warm + n)
    token, out, t0 = first_token, [], None
    with torch.inference_mode():
        for i in range(warm + n):
            if i == warm:
                t0 = time.perf_counter()
            batch = ForwardBatch.build([0], [depth + i], [1], [blocks], cache.block_size, device=device)
            logits = model(model.embed(torch.tensor([token], device=device)), batch, cache)
            token = int(logits[0].max(-1).indices)
            if i >= warm:
                out.append(token)
    return out, n / (time.perf_counter() - t0)


def depth_bench(model: str | None, depths: list[int], layers: int = 40, quantization: str | None = "int4",
                decode_tokens: int = 32, window: int = 512, kv_cache_dtype: str = "int8", filled: bool = False,
                max_num_batched_tokens: int | None = None, seed: int = 0) -> dict:
    """Prefill to each depth and decode after it (or, filled, decode at depth only): see the module docstring.
    One engine for all depths, sized for the deepest; peak RSS is the process's peak so far (the driver runs
    one depth per process)."""
    from .measure import peak_rss_gb

    # a whole number of 64-token blocks (plan.plan_caches sizes the KV cache in blocks, and refuses a
    # max_model_len past the last whole block it holds)
    longest = -(-(max(depths) + decode_tokens + WARM_STEPS + 2) // 64) * 64
    # prefix caching off: one request, nothing to reuse (and llama-bench has none); its snapshots would add
    # their copies to the prefill and to resident memory
    llm, load_s = load(model, layers, quantization, longest, kv_cache_dtype, max_num_batched_tokens,
                       enable_prefix_caching=False)
    engine = llm.engine()
    V = llm.config.text.vocab_size
    cache = engine.cache
    kv_per_token = cache.bytes_per_block() / cache.block_size
    result = {"bench": "context", "mode": "filled" if filled else "prefill", "model": str(llm.path),
              "layers": llm.config.text.num_hidden_layers, "quantization": quantization,
              "kv_cache_dtype": kv_cache_dtype, "kv_storage": kv_storage(llm),
              "kv_bytes_per_token": round(kv_per_token, 1),
              "max_num_batched_tokens": llm.engine_config.max_num_batched_tokens, "threads": _torch_threads(),
              "decode_tokens": decode_tokens, "window": window, "load_s": round(load_s, 1), "cpu": cpu_model()}
    if filled:
        result["note"] = FILLED_NOTE
    else:   # warm-up: a short request of its own (kernels, the decode plan, first touch of the step buffers)
        w = min(2 * window, max(depths))
        list(llm.generate_stream(_random_prompt(w, V, seed + 1), _greedy(3)))
    rows = []
    for depth in depths:
        row = {"depth": depth, "kv_cache_gb": round(depth * kv_per_token / 1e9, 3)}
        if not filled:
            row.update(prefill_and_decode(llm, _random_prompt(depth, V, seed + depth), decode_tokens, window))
        fill_random(llm, depth, seed)
        _, rate = decode_at_depth(llm, depth, _random_prompt(1, V, seed)[0], decode_tokens)
        row["decode_tok_s_filled"] = round(rate, 2)
        row["peak_rss_gb"] = round(peak_rss_gb(), 2)
        rows.append(row)
    result["depths"] = rows
    return result


def _greedy(n: int):
    from ..sampling import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def format_depths(result: dict) -> str:
    """A text table of depth_bench's result."""
    head = (f"qwen36 at depth: {result['model']} ({result['layers']} layers, {result['quantization']}), KV "
            f"{result['kv_storage']} (asked {result['kv_cache_dtype']}), {result['threads']} threads, "
            f"{result['max_num_batched_tokens']} tokens per prefill step; {result['cpu']}")
    lines = [head]
    if result["mode"] == "filled":
        lines.append(f"({result['note']})")
        lines.append(f"{'depth':>7} {'decode tok/s':>13} {'KV GB':>7} {'peak RSS GB':>12}")
        for r in result["depths"]:
            lines.append(f"{label(r['depth']):>7} {r['decode_tok_s_filled']:>13} {r['kv_cache_gb']:>7} "
                         f"{r['peak_rss_gb']:>12}")
        return "\n".join(lines)
    last = f"last {result['window']} tok/s"
    lines.append(f"{'depth':>7} {'prefill s':>10} {'prefill tok/s':>14} {last:>15} {'decode tok/s':>13} "
                 f"{'filled decode':>14} {'KV GB':>7} {'peak RSS GB':>12}")
    for r in result["depths"]:
        lines.append(f"{label(r['depth']):>7} {r['prefill_s']:>10} {r['prefill_tok_s']:>14} "
                     f"{r['prefill_tok_s_last']:>15} {r['decode_tok_s']:>13} {r['decode_tok_s_filled']:>14} "
                     f"{r['kv_cache_gb']:>7} {r['peak_rss_gb']:>12}")
    lines.append(f"(decode: {result['decode_tokens']} greedy tokens after the prompt; filled decode: the same at the "
                 f"same depth after {FILLED_NOTE[len('decode at depth with '):]})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ KV error
def logits_at_depth(model, prompt: list[int], kv_dtype: str, last: int, chunk: int):
    """float32 [last, V]: the logits of the prompt's last `last` positions with KV stored as `kv_dtype`: the
    prompt's first len - last tokens prefilled in chunks of `chunk` (as the engine's steps), then the last ones
    one token at a time, teacher-forced, each step reading every earlier row from the cache."""
    import torch

    n = len(prompt)
    cache = model.new_cache(1, n, kv_dtype=kv_dtype)
    ids = torch.tensor(prompt, device=model.embed_tokens.weight.device)
    out = []
    model.backend.prepare_thread()
    with torch.inference_mode():
        for s in range(0, n - last, chunk):
            k = min(chunk, n - last - s)
            model(model.embed(ids[s:s + k]), cache.batch([0], [s], [k]), cache)
        for p in range(n - last, n):
            out.append(model(model.embed(ids[p:p + 1]), cache.batch([0], [p], [1]), cache)[0])
    return torch.stack(out)


def compare_logits(ref, other) -> dict:
    """KL(ref || other) per row (nats, from log-softmax in fp64): mean and max; top-1 agreement."""
    import torch

    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).double().mean()),
            "positions": int(ref.shape[0])}


def kv_error(model: str | None, depths: list[int], layers: int = 4, quantization: str | None = "int4",
             last: int = 64, others: tuple[str, ...] = ("bfloat16", "int8"), chunk: int = 512, seed: int = 0) -> dict:
    """For each depth: `logits_at_depth` with float32 KV, then with each of `others`, compared
    (`compare_logits`). The weights are loaded once; each run has its own cache."""
    llm, load_s = load(model, layers, quantization, -(-max(depths) // 64) * 64, "float32",
                       enable_prefix_caching=False)
    V = llm.config.text.vocab_size
    result = {"bench": "kv_error", "model": str(llm.path), "layers": llm.config.text.num_hidden_layers,
              "quantization": quantization, "last": last, "chunk": chunk, "threads": _torch_threads(),
              "load_s": round(load_s, 1),
              "cpu": cpu_model(), "depths": []}
    for depth in depths:
        if depth <= last:
            raise ValueError(f"depth {depth}: the prompt must be longer than the {last} positions compared")
        prompt = _random_prompt(depth, V, seed + depth)
        t = time.perf_counter()
        ref = logits_at_depth(llm.model, prompt, "float32", last, chunk)
        row = {"depth": depth, "seconds": {"float32": round(time.perf_counter() - t, 1)}}
        for other in others:
            t = time.perf_counter()
            got = logits_at_depth(llm.model, prompt, other, last, chunk)
            row["seconds"][other] = round(time.perf_counter() - t, 1)
            row[other] = {**compare_logits(ref, got),
                          "note": KV_ERROR_NOTE.format(last=last, depth=depth, other=other)}
            del got
        del ref
        result["depths"].append(row)
    return result


def format_kv_error(result: dict) -> str:
    lines = [f"KV-cache error: {result['model']} ({result['layers']} layers, {result['quantization']} weights); "
             f"{result['cpu']}",
             f"{'depth':>7} {'KV':>9} {'mean KL':>10} {'max KL':>10} {'top-1':>7}   what"]
    for r in result["depths"]:
        for other in ("bfloat16", "int8"):
            if other in r:
                e = r[other]
                lines.append(f"{label(r['depth']):>7} {other:>9} {e['kl_mean']:>10.3g} {e['kl_max']:>10.3g} "
                             f"{100 * e['top1_agreement']:>6.1f}%   {other} vs float32 KV, last {e['positions']} "
                             "positions, qwen36")
        e = r.get("llamacpp")
        if e and "kl_mean" in e:
            lines.append(f"{label(r['depth']):>7} {'q8_0':>9} {e['kl_mean']:>10.3g} {e['kl_max']:>10.3g} "
                         f"{e['top1_agreement'] * 100:>6.1f}%   q8_0 vs f16 KV, llama.cpp, positions "
                         f"{e['first']}..{e['end']}")
            if "floor" in e:
                f = e["floor"]
                lines.append(f"{label(r['depth']):>7} {'f16':>9} {f['kl_mean']:>10.3g} {f['kl_max']:>10.3g} "
                             f"{f['top1_agreement'] * 100:>6.1f}%   f16 vs f16 KV, llama.cpp: its measurement's floor")
        elif e:
            lines.append(f"{label(r['depth']):>7} {'q8_0':>9}   llama.cpp: {e.get('skipped') or e.get('error')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ llama.cpp
def llama_tool(name: str) -> str:
    """A llama.cpp binary: $LLAMA_BENCH for llama-bench (else $LLAMA_<NAME>), else
    $ANCHOR/build/bin/<name> with $ANCHOR defaulting to ~/.cache/llamacpp-anchor (docs/performance.md)."""
    env = "LLAMA_BENCH" if name == "llama-bench" else "LLAMA_" + name.removeprefix("llama-").upper().replace("-", "_")
    exe = os.environ.get(env) or str(Path(os.environ.get("ANCHOR", Path.home() / ".cache/llamacpp-anchor"))
                                     / "build/bin" / name)
    if not Path(exe).exists():
        raise FileNotFoundError(f"{exe}: no {name}; build llama.cpp (docs/performance.md: cmake --build BUILD "
                                f"--target {name}) or set ${env}")
    return exe


def random_text(path: Path, words: int, seed: int = 0) -> Path:
    """A deterministic file of `words` random English words (lines of 12-20), for llama-perplexity."""
    vocab = ("the of and to in is was for on that with as by at from his her it an are were which be this has "
             "had not but or have their one all also new first two after its been more other time city school "
             "river north south house music world state part game team water light small great high old early "
             "long round point paper water field story order power house line place group stone market bridge "
             "garden winter summer island mountain forest station village letter number family").split()
    rng = random.Random(seed)
    lines, n = [], 0
    while n < words:
        k = rng.randint(12, 20)
        lines.append(" ".join(rng.choice(vocab) for _ in range(k)).capitalize() + ".")
        n += k
    path.write_text("\n".join(lines) + "\n")
    return path


def llamacpp_kv_error(gguf: str, ctx: int, n_threads: int, workdir: Path, n_vocab: int = 248320,
                      batch: int = 2048, floor: bool = True) -> dict:
    """llama.cpp's KV error at context `ctx`: llama-perplexity on one chunk of random text with f16 KV writing
    its logits (--kl-divergence-base), then with q8_0 KV comparing against them (--kl-divergence); its mean and
    maximum KL and "same top p". floor: also f16 KV against the same base, the measurement's own floor (the
    base stores log-probabilities in 16 bits). Skipped (said why) where llama-perplexity's buffers (ctx x
    vocabulary fp32 logits reserved, half of them and the saved log-probabilities touched) cannot fit."""
    from ..hugepages import meminfo

    exe = llama_tool("llama-perplexity")
    need = ctx * n_vocab * 4 // 2 + ctx * (n_vocab + 4) * 2
    total, available = meminfo("MemTotal") or 0, meminfo("MemAvailable") or 0
    if ctx * n_vocab * 4 > total or need > available * 0.9:
        return {"skipped": f"llama-perplexity at c={ctx} reserves {ctx * n_vocab * 4 / 2**30:.0f} GiB of logits and "
                           f"touches ~{need / 2**30:.0f} GiB; this machine has {available / 2**30:.0f} GiB available"}
    workdir.mkdir(parents=True, exist_ok=True)
    text = random_text(workdir / f"random-words-{ctx}.txt", 3 * ctx)
    base = workdir / f"kl-base-f16-{ctx}.bin"
    common = ["-m", gguf, "-c", str(ctx), "-b", str(min(batch, ctx)), "-t", str(n_threads), "-fa", "on"]
    cmd_base = [exe, *common, "-f", str(text), "--chunks", "1", "-ctk", "f16", "-ctv", "f16",
                "--kl-divergence-base", str(base)]
    cmd_kl = [exe, *common, "-ctk", "q8_0", "-ctv", "q8_0", "--kl-divergence-base", str(base), "--kl-divergence"]
    cmd_floor = [exe, *common, "-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", str(base), "--kl-divergence"]
    runs = [("base", cmd_base), ("q8_0", cmd_kl)] + ([("floor", cmd_floor)] if floor else [])
    out = {"commands": [" ".join(c) for _, c in runs], "ctx": ctx, "first": ctx // 2, "end": ctx - 2,
           "note": LLAMA_KL_NOTE.format(ctx=ctx, first=ctx // 2, end=ctx - 2, batch=min(batch, ctx)), "seconds": {}}
    try:
        for name, cmd in runs:
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            out["seconds"][name] = round(time.perf_counter() - t, 1)
            if r.returncode:
                out["error"] = f"{Path(cmd[0]).name} exited {r.returncode}: " + (r.stderr or r.stdout)[-1500:]
                return out
            if name == "base":
                continue
            log = r.stdout + r.stderr
            stats = parse_kl_log(log)
            if "kl_mean" not in stats:
                out["error"] = "no KL statistics in llama-perplexity's output: " + log[-1500:]
                return out
            if name == "q8_0":
                out.update(stats)
            else:     # f16 against its own base: what the base's 16-bit log-probabilities alone leave
                out["floor"] = {**stats, "note": FLOOR_NOTE}
    finally:
        base.unlink(missing_ok=True)         # ~ctx/2 x vocabulary x 2 bytes
    return out


def parse_kl_log(log: str) -> dict:
    """llama-perplexity --kl-divergence's statistics: mean and maximum KLD, same top p."""
    out = {}
    for key, pattern in (("kl_mean", r"Mean\s+KLD:\s+([-\d.eE+]+)"), ("kl_max", r"Maximum KLD:\s+([-\d.eE+]+)"),
                         ("top1_agreement", r"Same top p:\s+([-\d.eE+]+)")):
        m = re.search(pattern, log)
        if m:
            out[key] = float(m.group(1)) / (100 if key == "top1_agreement" else 1)
    return out


def llamabench_at_depth(gguf: str, depth: int, prompt: int, gen: int, n_threads: int, ctk: str = "q8_0",
                        ctv: str = "q8_0") -> list[str]:
    """llama-bench at depth: pp `prompt` @ d depth, tg `gen` @ d depth, one
    repetition (the driver's rounds repeat), flash attention, q8_0 KV; --progress lines time its depth run."""
    cmd = [llama_tool("llama-bench"), "-m", gguf, "-fa", "1", "-ctk", ctk, "-ctv", ctv, "-d", str(depth),
           "-p", str(prompt), "-n", str(gen), "-t", str(n_threads), "-r", "1", "--progress", "-o", "json"]
    return cmd


def parse_llamabench(stdout: str, stderr_lines: list[tuple[float, str]], depth: int) -> dict:
    """llama-bench's JSON (pp and tg tok/s at depth) and its prefill to depth: the time from its first
    'depth run' progress line (the untimed prefill of `depth` tokens) to the next progress line."""
    out = {}
    for r in json.loads(stdout):
        key = "pp_tok_s" if r.get("n_prompt") else "tg_tok_s"
        out[key] = round(float(r["avg_ts"]), 2)
        out["build_commit"] = r.get("build_commit")
    times = [(t, line) for t, line in stderr_lines if line.startswith("llama-bench: benchmark")]
    for i, (t, line) in enumerate(times):
        if re.search(r"depth run \d+/\d+$", line) and i + 1 < len(times):
            out["prefill_s"] = round(times[i + 1][0] - t, 3)
            out["prefill_tok_s"] = round(depth / out["prefill_s"], 2)
            break
    return out


# ------------------------------------------------------------------------------------------ the driver
def run_child(cmd: list[str]) -> dict:
    """Run cmd as a fresh child; its stdout, its stderr lines with their arrival times, exit code, wall time and
    its own peak RSS (wait4's rusage of that child alone)."""
    with tempfile.TemporaryFile() as out:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, bufsize=1)
        lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in p.stderr]
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        stdout = out.read().decode()
    return {"rc": p.returncode, "stdout": stdout, "stderr_lines": lines, "wall_s": round(wall, 1),
            "peak_rss_gb": round(usage.ru_maxrss / (1 << 20), 2), "loadavg_before": load}


def ours_command(spec: dict, depth: int) -> list[str]:
    cmd = [sys.executable, "-m", "qwen36", "bench"]
    cmd += [spec["model"]] if spec.get("model") else ["--synthetic", "--layers", str(spec["layers"])]
    cmd += ["--context", str(depth), "--decode-tokens", str(spec["decode_tokens"]), "--prompt-len",
            str(spec["window"]), "--kv-cache-dtype", spec["kv_cache_dtype"], "--quantization",
            spec["quantization"] or "none", "--json"]
    if spec.get("filled"):
        cmd.append("--filled")
    if spec.get("max_num_batched_tokens"):
        cmd += ["--max-num-batched-tokens", str(spec["max_num_batched_tokens"])]
    return cmd


def drive(spec: dict, log=print) -> dict:
    """The side-by-side (module docstring): for each round, for each depth, ours then llama-bench, each a fresh
    child; then medians per depth and their ratios."""
    n_threads = spec.get("threads") or threads()
    runs = []
    for rnd in range(spec.get("rounds", 2)):
        for depth in spec["depths"]:
            cmd = ours_command(spec, depth)
            log(f"round {rnd + 1}, {label(depth)}: qwen36 ...", flush=True)
            r = run_child(cmd)
            entry = {"round": rnd + 1, "depth": depth, "engine": "qwen36", "command": " ".join(cmd),
                     **{k: r[k] for k in ("rc", "wall_s", "peak_rss_gb", "loadavg_before")}}
            if r["rc"] == 0:
                entry["result"] = json.loads(r["stdout"].strip().splitlines()[-1])
            else:
                entry["error"] = "\n".join(line for _, line in r["stderr_lines"][-20:])
            runs.append(entry)
            log(f"  {_brief(entry)}", flush=True)
            if spec.get("gguf"):
                cmd = llamabench_at_depth(spec["gguf"], depth, spec["window"], spec["decode_tokens"], n_threads)
                log(f"round {rnd + 1}, {label(depth)}: llama.cpp ...", flush=True)
                r = run_child(cmd)
                entry = {"round": rnd + 1, "depth": depth, "engine": "llama.cpp", "command": " ".join(cmd),
                         **{k: r[k] for k in ("rc", "wall_s", "peak_rss_gb", "loadavg_before")}}
                if r["rc"] == 0:
                    entry["result"] = parse_llamabench(r["stdout"], r["stderr_lines"], depth)
                else:
                    entry["error"] = "\n".join(line for _, line in r["stderr_lines"][-20:])
                runs.append(entry)
                log(f"  {_brief(entry)}", flush=True)
    return {"bench": "context-side-by-side", "cpu": cpu_model(), "threads": n_threads, "spec": spec,
            "runs": runs, "summary": summarize(runs, spec["depths"])}


def _brief(entry: dict) -> str:
    if "error" in entry:
        return f"{entry['engine']} failed (exit {entry['rc']}): {entry['error'][-300:]}"
    r = entry["result"]
    if entry["engine"] == "qwen36":
        d = r["depths"][0]
        return (f"qwen36: prefill {d.get('prefill_s')} s ({d.get('prefill_tok_s')} tok/s, last "
                f"{d.get('prefill_last_tokens')}: {d.get('prefill_tok_s_last')}), decode {d.get('decode_tok_s')} tok/s "
                f"(filled {d['decode_tok_s_filled']}), KV {r['kv_storage']}, peak RSS {entry['peak_rss_gb']} GB, "
                f"{entry['wall_s']} s")
    return (f"llama.cpp: prefill {r.get('prefill_s')} s ({r.get('prefill_tok_s')} tok/s), pp {r.get('pp_tok_s')}, "
            f"tg {r.get('tg_tok_s')} tok/s, peak RSS {entry['peak_rss_gb']} GB, {entry['wall_s']} s")


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarize(runs: list[dict], depths: list[int]) -> list[dict]:
    """Per depth: the medians over rounds of each engine's figures, and ours / llama.cpp."""
    rows = []
    for depth in depths:
        ours = [e["result"]["depths"][0] | {"peak_rss_gb": e["peak_rss_gb"]} for e in runs
                if e["depth"] == depth and e["engine"] == "qwen36" and "result" in e]
        peer = [e["result"] | {"peak_rss_gb": e["peak_rss_gb"]} for e in runs
                if e["depth"] == depth and e["engine"] == "llama.cpp" and "result" in e]
        row = {"depth": depth, "rounds": len(ours)}
        for key in ("prefill_s", "prefill_tok_s", "prefill_tok_s_last", "decode_tok_s", "decode_tok_s_filled",
                    "peak_rss_gb"):
            row[f"ours_{key}"] = _median([o.get(key) for o in ours])
        if peer:
            for key in ("prefill_s", "prefill_tok_s", "pp_tok_s", "tg_tok_s", "peak_rss_gb"):
                row[f"llamacpp_{key}"] = _median([p.get(key) for p in peer])
            for ours_key, peer_key in (("prefill_tok_s", "prefill_tok_s"), ("prefill_tok_s_last", "pp_tok_s"),
                                       ("decode_tok_s", "tg_tok_s")):
                a, b = row[f"ours_{ours_key}"], row[f"llamacpp_{peer_key}"]
                row[f"ratio_{ours_key}"] = round(a / b, 2) if a and b else None
        rows.append(row)
    return rows


def format_side_by_side(result: dict) -> str:
    spec = result["spec"]
    P, N = spec["window"], spec["decode_tokens"]
    lines = [f"qwen36 vs llama.cpp at depth, {result['threads']} threads, CPU: {result['cpu']}; medians of "
             f"{spec.get('rounds', 2)} interleaved rounds, each engine a fresh process alone",
             "ours: python " + " ".join(result["runs"][0]["command"].split()[1:]) if result["runs"] else "",
             "llama.cpp: " + next((e["command"] for e in result["runs"] if e["engine"] == "llama.cpp"), "(none)"),
             "",
             f"| depth | prefill to depth, s: ours / llama.cpp | prefill tok/s (last {P}): ours / llama.cpp "
             f"pp{P} | decode tok/s ({N} tokens): ours / llama.cpp tg{N} | ours, filled cache | peak RSS GB: ours / "
             "llama.cpp |",
             "|---|---|---|---|---|---|"]
    for r in result["summary"]:
        def pair(a, b, ratio=None):
            s = f"{r.get(a)} / {r.get(b, '-')}"
            return s + (f" (**{r[ratio]}×**)" if ratio and r.get(ratio) else "")
        lines.append(f"| {label(r['depth'])} | {pair('ours_prefill_s', 'llamacpp_prefill_s', 'ratio_prefill_tok_s')} | "
                     f"{pair('ours_prefill_tok_s_last', 'llamacpp_pp_tok_s', 'ratio_prefill_tok_s_last')} | "
                     f"{pair('ours_decode_tok_s', 'llamacpp_tg_tok_s', 'ratio_decode_tok_s')} | "
                     f"{r.get('ours_decode_tok_s_filled')} | {pair('ours_peak_rss_gb', 'llamacpp_peak_rss_gb')} |")
    lines += ["", "ratios: ours / llama.cpp in tok/s (prefill to depth: the inverse ratio of the times). llama.cpp's "
              f"prefill to depth is its untimed depth run (from --progress line times); its pp{P} covers tokens "
              f"D..D+{P}, ours the prompt's last {P} tokens; both decode from depth D."]
    return "\n".join(lines)


def command(args) -> int:
    """`qwen36 bench --context` / `--kv-error` (cli.cmd_bench hands the parsed arguments here)."""
    if args.context and args.kv_error:
        raise ValueError("give --context or --kv-error, not both")
    if args.model is None and not args.synthetic:
        raise ValueError("bench --context / --kv-error needs MODEL or --synthetic")
    quantization = None if args.quantization == "none" else args.quantization
    if args.kv_error:
        depths = parse_depths(args.kv_error)
        result = kv_error(args.model, depths, args.layers, quantization)
        if args.vs_llamacpp:       # after ours is done and its memory is back (llama-perplexity needs GBs)
            from ..paths import cache_dir
            for row in result["depths"]:
                row["llamacpp"] = llamacpp_kv_error(args.vs_llamacpp, row["depth"], threads(),
                                                    cache_dir() / "llamacpp-kl")
        print(json.dumps(result) if args.json else format_kv_error(result) + "\n" + json.dumps(result, indent=1))
        return 0
    depths = parse_depths(args.context)
    decode_tokens = args.decode_tokens or 32
    kv = args.kv_cache_dtype or "int8"
    if args.vs_llamacpp:
        spec = {"model": args.model, "layers": args.layers, "quantization": quantization, "depths": depths,
                "decode_tokens": decode_tokens, "window": args.prompt_len, "kv_cache_dtype": kv,
                "filled": args.filled, "max_num_batched_tokens": args.max_num_batched_tokens,
                "rounds": args.rounds, "gguf": args.vs_llamacpp, "json_out": args.out}
        sys.stdout.flush()
        sys.stderr.flush()
        # the driver holds nothing of ours while the engines run: this process becomes a plain script
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)])
    result = depth_bench(args.model, depths, args.layers, quantization, decode_tokens, args.prompt_len, kv,
                         args.filled, args.max_num_batched_tokens)
    print(json.dumps(result) if args.json else format_depths(result))
    return 0


def main(argv: list[str]) -> int:
    """The driver as a script: argv[0] is the JSON spec (the CLI execs this with it)."""
    spec = json.loads(argv[0])
    result = drive(spec)
    text = format_side_by_side(result)
    print(text)
    if spec.get("json_out"):
        Path(spec["json_out"]).write_text(json.dumps(result, indent=1) + "\n")
        print(f"(all rounds: {spec['json_out']})")
    return 0 if all("error" not in e for e in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
