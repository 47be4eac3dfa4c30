"""Benchmarks on a GPU at the real geometry with random weights made on the device: the 70 GB checkpoint is
neither needed nor written (what scripts/gpu_check.sh runs). `qwen36 device-bench --dry-run` runs the same code
on the CPU at a tiny geometry, to check the logic before spending GPU time.

  decode_b1       one request, 128-token prompt, 128 new tokens: decode tok/s, and the HBM roofline
                  (measured copy bandwidth / weight bytes a token reads) it reaches
  profile         an eager decode step under torch.profiler: the top operators, kernels per step
  throughput_cN   N concurrent requests, 128 in / 128 out (vLLM's `bench serve` shape): output tok/s
  prefill_8k      one 8,192-token prompt in one step: prompt tok/s
  offload_b1      routed experts of every layer int4 in CPU memory (--cpu-experts all): decode tok/s
Each part records its own error and the others still run.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch

from ..config import parse_text_config
from ..engine import Engine
from ..layers.moe import Experts
from ..loader import KEEP_FP32, prepare
from ..model import TextModel
from ..ops.backend import default_backend
from ..ops.qformat import QuantConfig
from ..quant import offload_experts
from ..sampling import SamplingParams
from ..synth import DEMO, REAL, random_quantized, random_weight, text_config
from .measure import copy_bandwidth_gbs, decode_rate, synchronize, weight_bytes_per_token

DRY = {**DEMO, "vocab_size": 4096}          # --dry-run: the real structure, tiny widths


def random_model(geometry: dict, dtype: torch.dtype, device, cpu_experts: int = 0, seed: int = 0) -> TextModel:
    """The text model with random weights made where they live: on `device`, and for cpu_experts=N the last
    N layers' routed experts as random int4 in CPU memory (as --cpu-experts keeps them)."""
    device = torch.device(device)
    cfg = parse_text_config(text_config(geometry))
    with torch.device("meta"):
        model = TextModel(cfg)
    n = cfg.num_hidden_layers
    qcfg = QuantConfig("int4", 128)
    targets = offload_experts(model, range(n - cpu_experts, n), qcfg) if cpu_experts else {}
    g = torch.Generator(device=device).manual_seed(seed)
    for name, (module, part) in targets.items():
        shape = (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size) if part == "gate_up_proj" \
            else (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        module.load(part, {k[1:]: v for k, v in random_quantized(shape, qcfg, g).items()})
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():          # drawn as synth.py draws a checkpoint's weights
        t = random_weight(name, tuple(p.shape), g, device)
        tensors[name] = t if name.endswith(KEEP_FP32) else t.to(dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    prepare(model, device, dtype, dtype)        # computes in `dtype` on the CPU too (a dry run mimics the GPU)
    return model


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def serve(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Run the requests to completion; wall time, and when each step that produced tokens ended."""
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for ids in prompts:
        engine.add_request(ids, p)
    stamps, tokens = [], 0
    t0 = time.perf_counter()
    while engine.has_work():
        out = engine.step()
        n = sum(len(o.token_ids) for o in out)
        if n:
            synchronize(engine.device)
            stamps.append(time.perf_counter())
            tokens += n
    return {"wall_s": time.perf_counter() - t0, "stamps": stamps, "tokens": tokens, "t0": t0}


def _engine(model, slots: int, max_len: int, graphs: bool, budget: int = 8192) -> Engine:
    return Engine(model, None, max_num_seqs=slots, max_model_len=max_len, max_num_batched_tokens=budget,
                  kv_cache_memory=4 << 30, enable_prefix_caching=False, cuda_graphs=graphs)


def decode_b1(model, graphs: bool, n: int = 128) -> dict:
    engine = _engine(model, 1, 512, graphs)
    ids = _prompts(1, 128, model.cfg.vocab_size, 1)
    serve(engine, ids, 8)                                                      # warm-up (graphs recorded)
    s = serve(engine, ids, n)["stamps"]
    return {"decode_tok_s": decode_rate(s), "graphs": graphs,
            "graph_steps": engine.graphs.replays if engine.graphs is not None else 0}


def profile_decode(model, steps: int = 4) -> dict:
    """Where an eager batch-1 decode step's time goes: torch.profiler's top operators by device time (by
    CPU time without a GPU), and how many kernels a step launches (what CUDA graphs save)."""
    from torch.profiler import ProfilerActivity, profile

    engine = _engine(model, 1, 512, False)
    ids = _prompts(1, 128, model.cfg.vocab_size, 6)
    serve(engine, ids, 4)                                                      # warm-up
    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    p = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    engine.add_request(ids[0], p)
    engine.step()                                                              # the prefill, not profiled
    with profile(activities=acts) as prof:
        while engine.has_work():
            engine.step()
        synchronize(engine.device)
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
    launches = sum(e.count for e in events if cuda and getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA"))
    return {"steps": steps, "kernels_per_step": round(launches / steps) if cuda else None,
            "top": [[e.key, e.count, round(getattr(e, key, 0) / 1e3 / steps, 3)] for e in rows],
            "top_unit": "ms per step"}


def throughput(model, concurrency: int, graphs: bool, n: int = 128) -> dict:
    engine = _engine(model, concurrency, 512, graphs)
    serve(engine, _prompts(concurrency, 128, model.cfg.vocab_size, 2), 4)      # warm-up
    r = serve(engine, _prompts(concurrency, 128, model.cfg.vocab_size, 3), n)
    return {"concurrency": concurrency, "output_tok_s": round(r["tokens"] / r["wall_s"], 1),
            "total_tok_s": round((r["tokens"] + 128 * concurrency) / r["wall_s"], 1), "wall_s": round(r["wall_s"], 2)}


def prefill(model, length: int) -> dict:
    engine = _engine(model, 1, length + 16, False, budget=length)
    serve(engine, _prompts(1, min(512, length), model.cfg.vocab_size, 4), 1)    # warm-up
    r = serve(engine, _prompts(1, length, model.cfg.vocab_size, 5), 1)
    ttft = r["stamps"][0] - r["t0"]
    return {"prompt_tokens": length, "ttft_s": round(ttft, 3), "prompt_tok_s": round(length / ttft, 1)}


def run(device: str = "cuda", dtype: str = "bfloat16", dry_run: bool = False, parts: tuple[str, ...] = (),
        graphs: bool = True, out: str | None = None) -> dict:
    """The parts asked for (all by default); with `out`, the JSON so far is rewritten there after each part
    (a run cut short keeps what it measured)."""
    geometry = DRY if dry_run else REAL
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    res: dict = {"device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
                 "dtype": dtype, "geometry": "dry-run (tiny)" if dry_run else "Qwen3.6-35B-A3B",
                 "torch": torch.__version__}
    wanted = set(parts) or {"decode_b1", "profile", "throughput", "prefill_8k", "offload_b1"}

    def part(name, fn):
        if name.split("_c")[0] not in wanted and name.removesuffix("_eager") not in wanted:
            return
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - record it; the other parts still run
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: res[name]}), flush=True)
        if out:
            Path(out).write_text(json.dumps(res, indent=1) + "\n")

    if wanted - {"offload_b1"}:
        t = time.perf_counter()
        model = random_model(geometry, dt, device)
        res["build_s"] = round(time.perf_counter() - t, 1)
        bpt = weight_bytes_per_token(model)
        bw = copy_bandwidth_gbs(device, 1 << (30 if not dry_run else 24))
        res["weights_gb_per_token"], res["copy_gbs"] = round(bpt / 1e9, 3), round(bw, 1)
        res["roofline_tok_s"] = round(bw * 1e9 / bpt, 1)
        # without a GPU (dry run) the graph runner's static-buffer step runs uncaptured where the CPU kernels
        # are off (QWEN36_NO_NATIVE=1): the tensor-op path a GPU takes
        graphs_ok = graphs and (torch.device(device).type == "cuda" or model.backend.native is None)
        part("decode_b1", lambda: decode_b1(model, graphs_ok))
        part("decode_b1_eager", lambda: decode_b1(model, False))
        for name in ("decode_b1", "decode_b1_eager"):
            if "decode_tok_s" in res.get(name, {}):
                res[name]["of_roofline"] = round(res[name]["decode_tok_s"] / res["roofline_tok_s"], 3)
        part("profile", lambda: profile_decode(model))
        for c in (16, 64) if not dry_run else (2, 4):
            part(f"throughput_c{c}", lambda c=c: throughput(model, c, graphs_ok))
        part("prefill_8k", lambda: prefill(model, 8192 if not dry_run else 256))
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if "offload_b1" in wanted:
        def offload():
            if default_backend("cpu").native is None:   # the reference int4 path dequantizes every expert per call: minutes
                return {"skipped": "the CPU kernels did not build here (see the kernels log)"}
            m = random_model(geometry, dt, device, cpu_experts=geometry["num_hidden_layers"])
            assert not any(isinstance(x, Experts) for x in m.modules())
            return decode_b1(m, False, n=32)
        part("offload_b1", offload)
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res
