"""`qwen36 bench`: fixed-seed speed and memory workloads on a checkpoint or a synthesized one.

Reports prefill tok/s (one prompt, after a warm-up on it: median of three), time to first token, decode tok/s
at batch 1 and batch 8, peak RSS, weight bytes read per decoded token and the bandwidth that implies, next to the machine's measured
memory read bandwidth, and the time to preprocess and encode one 1024x768 image (the checkpoint's vision
tower, or a random one at the published geometry when it has none); with --vs-transformers the same
prompt through HF transformers (fp32), with --vs-llamacpp llama.cpp's llama-bench (peers.py). --structured and
--speculative add constrained and speculative decoding; --per-layer times one decode layer against its
weights' read time.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import parse_vision_config
from ..image import VisionPreprocess, preprocess_images
from ..llm import LLM
from ..sampling import SamplingParams
from ..structured import Guide, json_grammar
from ..synth import REAL_VISION
from ..vision import VisionTower
from .checkpoints import synthetic_checkpoint
from .measure import decode_rate, memory_bandwidth_gbs, peak_rss_gb, timed, weight_bytes_per_token
from .peers import llamacpp_bench, transformers_bench


def run(model: str | None, layers: int = 40, quantization: str | None = "int4", prompt_len: int = 512,
        decode_tokens: int = 128, vs_transformers: bool = False, experts: int = 256,
        max_ram: int | None = None, image: bool = True, structured: bool = False, speculative: int = 0,
        draft_vocab: int | None = None) -> dict:
    """The model workloads on `model` (None: the cached synthetic checkpoint of `layers` layers and `experts`
    experts at the real widths, quantized as asked): the figures listed at the top, and what the flags add."""
    torch.manual_seed(0)
    path = Path(model) if model else synthetic_checkpoint(layers, quantization, experts, mtp=speculative > 0)
    bandwidth = memory_bandwidth_gbs()
    spec = {"method": "mtp", "num_speculative_tokens": speculative} if speculative else None
    if spec and draft_vocab:
        spec["draft_vocab_size"] = draft_vocab
    llm, load_s = timed(lambda: LLM(path, dtype="bfloat16", quantization=None if model is None else quantization,
                                    max_model_len=prompt_len + decode_tokens + 8, max_num_seqs=8,
                                    max_ram=max_ram, enable_prefix_caching=False,   # repeated prompts
                                    speculative_config=spec))
    engine = llm.engine()
    engine.speculate(0)        # the plain figures first; speculative_decode_bench turns drafting on
    V = llm.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(V, 200000), (prompt_len,), generator=g).tolist()
    p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # warm-up on the same prompt (first touch of every expert's pages and of the prefill buffers, as
    # llama-bench warms up), then the median of three
    llm.generate(prompt, p1)
    ttft = sorted(timed(lambda: llm.generate(prompt, p1))[1] for _ in range(3))[1]
    pd = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    short = prompt[:16]
    out, t_all = timed(lambda: llm.generate(short, pd))
    _, t_first = timed(lambda: llm.generate(short, p1))
    decode_1 = (decode_tokens - 1) / max(t_all - t_first, 1e-9)
    batch = torch.randint(0, min(V, 200000), (8, 16), generator=g).tolist()
    outs, t8 = timed(lambda: llm.generate(batch, pd))
    decode_8 = sum(len(o.token_ids) for o in outs) / t8
    bytes_tok = weight_bytes_per_token(llm.model)
    result = {
        "model": str(path), "layers": llm.config.text.num_hidden_layers, "quantization": quantization,
        "threads": torch.get_num_threads(), "load_s": round(load_s, 1),
        "prefill_tokens": prompt_len, "prefill_tok_s": round(prompt_len / ttft, 2), "ttft_s": round(ttft, 3),
        "decode_tok_s_batch1": round(decode_1, 2), "decode_tok_s_batch8": round(decode_8, 2),
        "weight_bytes_per_token": bytes_tok, "achieved_gbs": round(bytes_tok * decode_1 / 1e9, 2),
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_fraction": round(bytes_tok * decode_1 / 1e9 / bandwidth, 3),
        "peak_rss_gb": round(peak_rss_gb(), 2), "max_ram_gb": round(max_ram / (1 << 30), 2) if max_ram else None,
    }
    if structured:
        result["structured"] = structured_decode_bench(llm, short, batch, decode_tokens)
    if speculative:
        result["speculative"] = speculative_decode_bench(llm, short, decode_tokens, speculative)
    if image:  # after peak RSS is taken: a random stand-in tower would not be part of the model's memory
        result["image"] = image_encode_bench(llm)
    if vs_transformers:  # one model in memory at a time
        del llm, out, outs
        gc.collect()
        result["transformers"] = transformers_bench(path, prompt, decode_tokens)
        hf = result["transformers"]
        for q in (None, "int4"):  # ours on the same checkpoint and prompt: fp32, then int4 quantized at load
            gc.collect()
            ours = ours_bench(path, prompt, decode_tokens, q)
            tag = "fp32" if q is None else q
            result[f"ours_{tag}"] = ours
            result[f"speedup_prefill_{tag}"] = round(hf["prefill_s"] / ours["prefill_s"], 2)
            result[f"speedup_decode_{tag}"] = round(ours["decode_tok_s"] / hf["decode_tok_s"], 2)
    return result


# a schema whose answer stays open for the whole run (a long string): every step computes a mask
LONG_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100000}}, "required": ["text"]}


def structured_decode_bench(llm, short: list[int], batch: list[list[int]], n: int, rounds: int = 3) -> dict:
    """Generation tok/s (a 16-token prompt, then n tokens) with and without a JSON schema, batch 1 and 8,
    alternated in the same run; schema compile time."""
    engine = llm.engine()
    if engine.grammar is None:
        return {"error": "the checkpoint has no tokenizer.json"}
    engine.grammar.warm()                                              # once per server (serve does it), not timed
    t0 = time.perf_counter()
    engine.grammar.check(json_grammar(LONG_SCHEMA), "JSON schema")
    compile_ms = (time.perf_counter() - t0) * 1000
    out = {"schema_compile_ms": round(compile_ms, 1)}
    # a grammar's first masks build its lexer tables; an agent repeats its schemas, so that is not timed
    llm.generate(short, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, json_schema=LONG_SCHEMA))
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):      # alternated, medians: a machine's speed can drift within a minute
        for label, extra in (("plain", {}), ("schema", {"json_schema": LONG_SCHEMA})):
            p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **extra)
            o, t1 = timed(lambda: llm.generate(short, p))
            runs.setdefault(f"decode_tok_s_batch1_{label}", []).append(len(o.token_ids) / t1)
            outs, t8 = timed(lambda: llm.generate(batch, p))
            runs.setdefault(f"decode_tok_s_batch8_{label}", []).append(sum(len(x.token_ids) for x in outs) / t8)
    out.update({k: round(sorted(v)[len(v) // 2], 2) for k, v in runs.items()})
    # the grammar's own cost, free of the machine's drift: replay the last constrained answer's tokens
    tokens = o.token_ids
    matcher = engine.grammar.matcher(json_grammar(LONG_SCHEMA))
    t0 = time.perf_counter()
    for t in tokens:
        Guide._compute(matcher, llm.config.text.vocab_size)
        matcher.consume_token(t)
    out["grammar_ms_per_token"] = round((time.perf_counter() - t0) * 1000 / max(len(tokens), 1), 3)
    for b in ("batch1", "batch8"):
        out[f"slowdown_{b}"] = round(1 - out[f"decode_tok_s_{b}_schema"] / out[f"decode_tok_s_{b}_plain"], 3)
    return out


# mean accepted length (tokens per verification step, the bonus token included) peers publish for this
# model's MTP head at k = 2 (docs/speculative-decoding.md)
PUBLISHED_ACCEPTED_LENGTH = 2.2


def speculative_decode_bench(llm, short: list[int], n: int, k: int, rounds: int = 3) -> dict:
    """Batch-1 decode tok/s without speculation, with the MTP head's own drafts (random weights: ~0%
    accepted) and with oracle drafts taken from the plain greedy run, all / half / none of each step's k
    drafts right, alternated in one run (medians); every speculative run's tokens must equal the plain
    run's. From the oracle runs: the time of a step as a function of the drafts accepted, hence an
    estimate (labelled so) at the accepted length peers publish for this model."""
    engine = llm.engine()
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    engine.speculate(0)
    want = llm.generate(short, p).token_ids

    def oracle(right):
        """Drafts from the plain run: the first right(step) of each step's drafts true, the rest wrong."""
        steps = [0]

        def override(r, drafts):
            m = len(r.output_ids)
            true, steps[0] = want[m:m + len(drafts)], steps[0] + 1
            n_right = right(steps[0])
            return [t if j < n_right else (t + 1) % llm.config.text.vocab_size for j, t in enumerate(true)]
        return override

    modes = {"plain": (0, None), "mtp": (k, None), "oracle_all": (k, oracle(lambda step: k)),
             # half of all drafts right: k/2 per step (odd k: alternately rounded up and down)
             "oracle_half": (k, oracle(lambda step: (k + step % 2) // 2)), "oracle_none": (k, oracle(lambda step: 0))}
    draft_time = [0.0, 0]
    speculator = engine.speculator
    real_propose = speculator.propose

    def timed_propose(*a, **kw):                     # the head's rows and drafts, per step
        t = time.perf_counter()
        out = real_propose(*a, **kw)
        draft_time[0] += time.perf_counter() - t
        draft_time[1] += 1
        return out

    runs: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    speculator.propose = timed_propose              # an instance attribute over the method, removed below
    try:
        for _ in range(rounds):
            for label, (spec_k, override) in modes.items():
                engine.speculate(spec_k, override)
                before = (engine.stats.spec_steps, engine.stats.draft_tokens, engine.stats.accepted_tokens)
                out, t = timed(lambda: llm.generate(short, p))
                steps, drafted, accepted = (a - b for a, b in zip(
                    (engine.stats.spec_steps, engine.stats.draft_tokens, engine.stats.accepted_tokens), before))
                runs.setdefault(label, []).append(len(out.token_ids) / t)
                info[label] = {"identical": out.token_ids == want, "steps": steps,
                               "acceptance": round(accepted / drafted, 3) if drafted else None,
                               "tokens_per_step": round(n / max(steps, 1), 2) if steps else 1.0}
    finally:
        engine.speculate(0)
        del speculator.propose
    med = {label: sorted(v)[len(v) // 2] for label, v in runs.items()}
    out = {"k": k, "tokens": n, "draft_vocab_size": speculator.head.ids.numel() if speculator.head.ids is not None
           else None, "drafting_ms_per_step": round(draft_time[0] / max(draft_time[1], 1) * 1000, 2)}
    for label in modes:
        out[label] = {"tok_s": round(med[label], 2), **info[label]}
    # step time vs accepted drafts, linear between the oracle's none and all (same k, same step shape)
    t_none = 1 / (med["oracle_none"] / info["oracle_none"]["tokens_per_step"])
    t_all = 1 / (med["oracle_all"] / info["oracle_all"]["tokens_per_step"])
    if k == 2:
        a = PUBLISHED_ACCEPTED_LENGTH - 1
        est = PUBLISHED_ACCEPTED_LENGTH / (t_none + (t_all - t_none) * a / k)
        out["estimate_at_published_acceptance"] = {
            "accepted_length": PUBLISHED_ACCEPTED_LENGTH, "tok_s": round(est, 2),
            "speedup": round(est / med["plain"], 2), "note": "estimate from the oracle runs, not measured"}
    out["speedup_oracle_all"] = round(med["oracle_all"] / med["plain"], 2)
    return out


def image_encode_bench(llm, width: int = 1024, height: int = 768) -> dict:
    """Preprocess + vision tower time for one random width x height image."""
    tower, source = llm.vision, "checkpoint"
    if tower is None:
        cfg = parse_vision_config({**REAL_VISION, "out_hidden_size": llm.config.text.hidden_size})
        tower, source = VisionTower(cfg).to(torch.bfloat16), "random weights, published geometry, bf16 storage"
        tower.compute_dtype = torch.float32
        tower.requires_grad_(False)
        for p in tower.parameters():                                           # not left uninitialised
            p.normal_(0, 0.02)
        pp = VisionPreprocess.for_vision_config(cfg)
    else:
        pp = llm.media.pp
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    (values, grid), pre_s = timed(lambda: preprocess_images([img], pp))
    with torch.inference_mode():
        small, small_grid = preprocess_images([img.resize((64, 64))], pp)
        tower(small.to(tower.compute_dtype), small_grid)                      # warm-up
        out, enc_s = timed(lambda: tower(values.to(tower.compute_dtype), grid))
    return {"size": f"{width}x{height}", "tower": source, "patches": int(values.shape[0]),
            "tokens": int(out.shape[0]), "preprocess_s": round(pre_s, 3), "encode_s": round(enc_s, 2)}


def ours_bench(path: Path, prompt: list[int], n: int, quantization: str | None) -> dict:
    """transformers_bench's workload through our engine (fp32 compute, weights as `quantization` says)."""
    llm = LLM(path, dtype="float32", quantization=quantization, enable_prefix_caching=False)
    p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompt, p1)                                                   # warm-up, same shapes
    _, prefill = timed(lambda: llm.generate(prompt, p1))
    pn = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.generate_stream(prompt, pn)]   # one step per new token
    return {"prefill_s": round(prefill, 3), "decode_tok_s": decode_rate(stamps)}


def per_layer_cost(depths: tuple[int, int], quantization: str | None = "int4", n: int = 64, rounds: int = 7) -> dict:
    """A decode layer's cost against the time its weights take to read: batch-1 decode at two depths (same
    widths) back to back in each round; a round's ms per layer = the difference of its ms per token / the
    difference of depths (pairing cancels a machine's slow drifts); the median over rounds, set beside the
    weight bytes a layer reads per token at the read bandwidth measured in the same rounds (median)."""
    llms = {d: LLM(synthetic_checkpoint(d, quantization, mtp=True), dtype="bfloat16", max_model_len=n + 32,
                   enable_prefix_caching=False) for d in depths}
    prompt = list(range(1000, 1016))
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for llm in llms.values():
        llm.generate(prompt, p)                                        # warm-up
    ms: dict[int, list[float]] = {d: [] for d in depths}
    bandwidth = []
    for _ in range(rounds):
        bandwidth.append(memory_bandwidth_gbs())
        for d, llm in llms.items():
            _, t1 = timed(lambda: llm.generate(prompt, p1))
            _, tn = timed(lambda: llm.generate(prompt, p))
            ms[d].append((tn - t1) / (n - 1) * 1000)
    a, b = depths
    per_round = [(y - x) / (b - a) for x, y in zip(ms[a], ms[b])]
    layer_ms = sorted(per_round)[len(per_round) // 2]
    layer_bytes = (weight_bytes_per_token(llms[b].model) - weight_bytes_per_token(llms[a].model)) / (b - a)
    gbs = sorted(bandwidth)[len(bandwidth) // 2]
    read_ms = layer_bytes / gbs / 1e6
    return {"ms_per_token": {str(d): round(sorted(v)[len(v) // 2], 2) for d, v in ms.items()},
            "ms_per_layer": round(layer_ms, 3), "ms_per_layer_rounds": [round(v, 3) for v in per_round],
            "weight_mb_per_layer": round(layer_bytes / 1e6, 1), "memory_bandwidth_gbs": round(gbs, 2),
            "weight_read_ms_per_layer": round(read_ms, 3), "ratio_to_weight_read": round(layer_ms / read_ms, 2)}


@dataclass
class BenchOptions:
    """What `qwen36 bench` runs: the model workloads of `run` on `model` (None: a synthetic checkpoint of
    `layers` layers and `experts` experts at the real widths), then the peers asked for; or, with per_layer
    (A, B), only `per_layer_cost` at those two depths."""
    model: str | None = None
    layers: int = 40
    experts: int = 256
    quantization: str | None = "int4"
    prompt_len: int = 512
    decode_tokens: int = 128
    max_ram: int | None = None                  # bytes
    image: bool = True
    structured: bool = False
    speculative: int = 0                        # drafts per step; 0: no speculation
    draft_vocab: int | None = None
    vs_transformers: bool = False
    vs_llamacpp: str | None = None              # a GGUF of the same model for llama-bench
    per_layer: tuple[int, int] | None = None


def run_bench(o: BenchOptions) -> dict:
    """The figures `qwen36 bench` prints."""
    if o.per_layer:
        return per_layer_cost(o.per_layer, o.quantization, o.decode_tokens)
    result = run(o.model, o.layers, o.quantization, o.prompt_len, o.decode_tokens, o.vs_transformers, o.experts,
                 o.max_ram, o.image, o.structured, o.speculative, o.draft_vocab)
    if o.vs_llamacpp:       # the peer on the same model geometry, right after ours (same machine state)
        peer = llamacpp_bench(o.vs_llamacpp, o.prompt_len, o.decode_tokens, torch.get_num_threads())
        result["llamacpp"] = peer
        for key in ("prefill_tok_s", "decode_tok_s_batch1"):
            if key in peer:
                result[f"ratio_{key}"] = round(result[key] / peer[key], 2)
    return result
