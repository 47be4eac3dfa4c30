"""Synthesize checkpoints in the official Hugging Face layout (random weights, deterministic per seed).

The layout is written from the published tensor list (the official checkpoint's index), not from
our model's module tree, so loading it is a real test of the loader: VL-wrapper config.json,
`model.language_model.*` text weights in bf16 (A_log and the gated-norm weight in fp32), fused experts
`mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] (or per-expert tensors), `lm_head.weight`,
optional `model.visual.*` tower and per-expert `mtp.*` block, sharded safetensors + index.

`to_fp8_checkpoint` turns such a checkpoint into Qwen's block-FP8 layout (Qwen/Qwen3.6-35B-A3B-FP8), and
`write_dequantized` writes the float checkpoint an FP8 one stands for (what the reference is fed in tests).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loader import KEEP_FP32

# Text geometries, written as config.json's text_config keys.
DEMO = dict(
    vocab_size=248320, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, full_attention_interval=4,
)
# The published Qwen3.6-35B-A3B text geometry.
REAL = dict(
    vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128, linear_num_value_heads=32,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, full_attention_interval=4,
)
# The published Qwen3.6-35B-A3B vision tower (out_hidden_size = the text hidden size, 2048).
REAL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                   hidden_act="gelu_pytorch_tanh", model_type="qwen3_5_moe")
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                   hidden_act="gelu_pytorch_tanh", model_type="qwen3_5_moe")
SPECIAL_IDS = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                   vision_end_token_id=248054)


def text_config(geometry: dict) -> dict:
    """A full text_config in the published form (layer_types spelled out, rope_parameters)."""
    g = dict(geometry)
    n = g["num_hidden_layers"]
    interval = g.pop("full_attention_interval", 4)
    layer_types = g.pop("layer_types", None) or [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    tc = dict(
        model_type="qwen3_5_moe_text", attention_bias=False, attention_dropout=0.0, attn_output_gate=True,
        bos_token_id=248044, eos_token_id=248044, dtype="bfloat16", hidden_act="silu", initializer_range=0.02,
        layer_types=layer_types, mamba_ssm_dtype="float32", max_position_embeddings=262144,
        mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False, output_router_logits=False,
        pad_token_id=None, partial_rotary_factor=0.25, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
        tie_word_embeddings=False, use_cache=True,
        rope_parameters=dict(mrope_interleaved=True, mrope_section=[11, 11, 10], partial_rotary_factor=0.25,
                             rope_theta=10000000, rope_type="default"),
    )
    tc.update(g)
    return tc


def model_config(geometry: dict, vision: dict | None = TINY_VISION, text_only: bool = False) -> dict:
    tc = text_config(geometry)
    if text_only:
        return {**tc, "architectures": ["Qwen3_5MoeForCausalLM"]}
    cfg = dict(architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe",
               text_config=tc, tie_word_embeddings=False, transformers_version="4.57.1", **SPECIAL_IDS)
    if vision is not None:
        cfg["vision_config"] = {**vision, "out_hidden_size": tc["hidden_size"]}
    return cfg


class _Rand:
    """Deterministic random tensors; projections scaled by fan-in so activations stay O(1)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * std

    def proj(self, out_f: int, in_f: int) -> torch.Tensor:
        return self.normal((out_f, in_f), 1.0 / math.sqrt(in_f))

    def uniform(self, shape, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self.g)


def spread(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """How a random text-model weight is drawn, by its name (ours, or the checkpoint's under any prefix) and
    shape: ("normal", std), ("one_plus", std) for 1 + normal(std) (the gated norm's plain weight), or
    ("uniform", hi) for [0, hi). Projections get std 1/sqrt(fan_in) so activations stay O(1), routers four times
    that (spread router logits), norms stay near their identity."""
    module = name.rsplit(".", 2)[-2] if "." in name else ""
    if name.endswith("A_log"):
        return "uniform", 2.5
    if name.endswith("linear_attn.norm.weight"):
        return "one_plus", 0.1
    if "norm" in module:
        return "normal", 0.1
    if name.endswith(("conv1d.weight", "dt_bias")):
        return "normal", 0.5
    if name.endswith("embed_tokens.weight"):
        return "normal", 1.0
    if name == "lm_head.weight":
        return "normal", 2.0 / math.sqrt(shape[-1])
    if name.endswith("mlp.gate.weight"):
        return "normal", 4.0 / math.sqrt(shape[-1])
    return "normal", 1.0 / math.sqrt(shape[-1])


def random_weight(name: str, shape: tuple[int, ...], g: torch.Generator, device=None) -> torch.Tensor:
    """One fp32 weight drawn from g (on `device`, g's) as `spread` says."""
    kind, std = spread(name, shape)
    if kind == "uniform":
        return torch.rand(shape, generator=g, device=device).mul_(std)
    t = torch.randn(shape, generator=g, device=device).mul_(std)
    return t.add_(1.0) if kind == "one_plus" else t


def _layer_layout(p: str, tc: dict, kind: str) -> dict[str, tuple[int, ...]]:
    """A decoder layer's tensors (fused experts), name -> shape, in the order they are drawn."""
    H, E, I, S = tc["hidden_size"], tc["num_experts"], tc["moe_intermediate_size"], tc["shared_expert_intermediate_size"]
    t = {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)}
    if kind == "full_attention":
        nq, nkv, d = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
        a = f"{p}.self_attn"
        t.update({f"{a}.q_proj.weight": (nq * d * 2, H), f"{a}.k_proj.weight": (nkv * d, H),
                  f"{a}.v_proj.weight": (nkv * d, H), f"{a}.o_proj.weight": (H, nq * d),
                  f"{a}.q_norm.weight": (d,), f"{a}.k_norm.weight": (d,)})
    else:
        nk, dk, nv, dv = (tc[k] for k in ("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads",
                                          "linear_value_head_dim"))
        conv, a = 2 * nk * dk + nv * dv, f"{p}.linear_attn"
        t.update({f"{a}.in_proj_qkv.weight": (conv, H), f"{a}.in_proj_z.weight": (nv * dv, H),
                  f"{a}.in_proj_b.weight": (nv, H), f"{a}.in_proj_a.weight": (nv, H),
                  f"{a}.conv1d.weight": (conv, 1, tc["linear_conv_kernel_dim"]), f"{a}.dt_bias": (nv,),
                  f"{a}.A_log": (nv,), f"{a}.norm.weight": (dv,), f"{a}.out_proj.weight": (H, nv * dv)})
    m = f"{p}.mlp"
    t.update({f"{m}.gate.weight": (E, H), f"{m}.experts.gate_up_proj": (E, 2 * I, H),
              f"{m}.experts.down_proj": (E, H, I), f"{m}.shared_expert.gate_proj.weight": (S, H),
              f"{m}.shared_expert.up_proj.weight": (S, H), f"{m}.shared_expert.down_proj.weight": (H, S),
              f"{m}.shared_expert_gate.weight": (1, H)})
    return t


def text_layout(tc: dict, prefix: str, mtp: bool) -> Iterator[tuple[str, dict[str, tuple[int, ...]]]]:
    """The text model's tensors in the official layout, name -> shape, as (part, group) in the order they are
    drawn and written: ("embed", the embedding), ("layer", each decoder layer), ("head", the final norm and
    lm_head), and with the MTP head ("mtp_fc", its fc) and ("mtp", its norms and its full-attention layer,
    whose experts the official checkpoint stores per expert). Experts are named fused here."""
    H, V = tc["hidden_size"], tc["vocab_size"]
    yield "embed", {f"{prefix}embed_tokens.weight": (V, H)}
    for i, kind in enumerate(tc["layer_types"]):
        yield "layer", _layer_layout(f"{prefix}layers.{i}", tc, kind)
    yield "head", {f"{prefix}norm.weight": (H,), "lm_head.weight": (V, H)}
    if mtp:
        yield "mtp_fc", {"mtp.fc.weight": (H, 2 * H)}
        norms = {f"mtp.{n}.weight": (H,) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
        yield "mtp", {**norms, **_layer_layout("mtp.layers.0", tc, "full_attention")}


# drawn quantized by the quantized writer: only their shapes are needed as floats (the largest tensors)
_SHAPE_ONLY = (".experts.gate_up_proj", ".experts.down_proj", "lm_head.weight", "mtp.fc.weight")


def _draw(group: dict[str, tuple[int, ...]], g: torch.Generator,
          shape_only: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {n: torch.empty(s, device="meta") if n.endswith(shape_only) else random_weight(n, s, g)
            for n, s in group.items()}


def _per_expert(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused experts as one tensor per expert and projection (the same weights), where the fused ones were."""
    out = {}
    for n, v in t.items():
        if n.endswith(".experts.gate_up_proj"):
            p, I = n.removesuffix(".gate_up_proj"), v.shape[1] // 2
            down = t[f"{p}.down_proj"]
            for e in range(v.shape[0]):
                out[f"{p}.{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{p}.{e}.up_proj.weight"] = v[e, I:].clone()
                out[f"{p}.{e}.down_proj.weight"] = down[e].clone()
        elif not n.endswith(".experts.down_proj"):
            out[n] = v
    return out


def text_tensors(tc: dict, seed: int, fused_experts: bool = True, prefix: str = "model.language_model.",
                 mtp: bool = True) -> dict[str, torch.Tensor]:
    """The text model's (and the MTP head's) random fp32 weights in the official layout, all in memory."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for part, group in text_layout(tc, prefix, mtp):
        drawn = _draw(group, g)
        t.update(drawn if fused_experts and part != "mtp" else _per_expert(drawn))
    return t


def vision_tensors(vc: dict, out_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    r = _Rand(seed + 1)
    D, F_, P, T, C = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["temporal_patch_size"], vc["in_channels"]
    M = D * vc["spatial_merge_size"] ** 2
    p = "model.visual"
    t = {f"{p}.patch_embed.proj.weight": r.normal((D, C, T, P, P), 1 / math.sqrt(C * T * P * P)),
         f"{p}.patch_embed.proj.bias": r.normal(D, 0.02),
         f"{p}.pos_embed.weight": r.normal((vc["num_position_embeddings"], D), 0.5)}
    for b in range(vc["depth"]):
        q = f"{p}.blocks.{b}"
        for n in ("norm1", "norm2"):
            t[f"{q}.{n}.weight"], t[f"{q}.{n}.bias"] = 1 + r.normal(D, 0.1), r.normal(D, 0.1)
        t[f"{q}.attn.qkv.weight"], t[f"{q}.attn.qkv.bias"] = r.proj(3 * D, D), r.normal(3 * D, 0.02)
        t[f"{q}.attn.proj.weight"], t[f"{q}.attn.proj.bias"] = r.proj(D, D), r.normal(D, 0.02)
        t[f"{q}.mlp.linear_fc1.weight"], t[f"{q}.mlp.linear_fc1.bias"] = r.proj(F_, D), r.normal(F_, 0.02)
        t[f"{q}.mlp.linear_fc2.weight"], t[f"{q}.mlp.linear_fc2.bias"] = r.proj(D, F_), r.normal(D, 0.02)
    t[f"{p}.merger.norm.weight"], t[f"{p}.merger.norm.bias"] = 1 + r.normal(D, 0.1), r.normal(D, 0.1)
    t[f"{p}.merger.linear_fc1.weight"], t[f"{p}.merger.linear_fc1.bias"] = r.proj(M, M), r.normal(M, 0.02)
    t[f"{p}.merger.linear_fc2.weight"], t[f"{p}.merger.linear_fc2.bias"] = r.proj(out_hidden, M), r.normal(out_hidden, 0.02)
    return t


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """Shard by bytes into model-0000i-of-0000n.safetensors plus the index (or one model.safetensors)."""
    names = list(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per = total / shards
    weight_map, groups, acc = {}, [[] for _ in range(shards)], 0
    for n in names:
        k = min(int(acc // per), shards - 1)
        groups[k].append(n)
        acc += tensors[n].numel() * tensors[n].element_size()
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(out: str | Path, geometry: dict, seed: int = 0, fused_experts: bool = True,
                     vision: dict | None = TINY_VISION, mtp: bool = True, shards: int = 2,
                     text_only: bool = False, dtype: torch.dtype = torch.bfloat16,
                     tokenizer: bool = False, quantization: str | None = None, streamed: bool = False,
                     progress: bool = False) -> Path:
    """Write a random checkpoint in the official layout; returns its directory. With quantization
    ("int8"|"int4") the weights are written directly in qwen36's quantized form, layer by layer, so even
    the full real geometry never needs more than one layer in memory (vision is left out; the MTP head,
    if asked, is written quantized too, under our fused names). streamed: plain `dtype` weights written the
    same way, one layer in memory at a time (no vision tower)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(geometry, None if text_only or quantization or streamed else vision, text_only)
    tc = cfg if text_only else cfg["text_config"]
    if quantization:
        from .ops.qformat import QuantConfig
        qcfg = QuantConfig(quantization)
        cfg["quantization_config"] = qcfg.to_json()
        write_streamed_text(out, tc, seed, qcfg, "model." if text_only else "model.language_model.",
                            mtp=mtp and not text_only, progress=progress)
    elif streamed:
        write_streamed_text(out, tc, seed, None, "model." if text_only else "model.language_model.",
                            mtp=mtp and not text_only, dtype=dtype, progress=progress)
    else:
        tensors = text_tensors(tc, seed, fused_experts, "model." if text_only else "model.language_model.",
                               mtp and not text_only)
        if vision is not None and not text_only:
            tensors.update(vision_tensors(vision, tc["hidden_size"], seed))
        tensors = {n: t if n.endswith(KEEP_FP32) else t.to(dtype) for n, t in tensors.items()}
        write_safetensors(tensors, out, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = dict(bos_token_id=248044, eos_token_id=[248046, 248044], pad_token_id=248044, do_sample=True,
               temperature=1.0, top_k=20, top_p=0.95, transformers_version="4.57.1")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if "vision_config" in cfg:
        write_preprocessor_configs(out, cfg["vision_config"])
    if tokenizer:  # the tokenizer files and our chat template, as an official checkpoint ships them
        from .chat import CHAT_TEMPLATE
        from .tokenizer import write_tokenizer_files
        write_tokenizer_files(out)
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def write_preprocessor_configs(out: Path, vc: dict) -> None:
    """preprocessor_config.json and video_preprocessor_config.json as Qwen3.6 ships them, with the pixel
    budgets scaled by (patch / 16)^2 so a tiny tower sees as many patches as the real one would."""
    scale = (vc["patch_size"] / 16) ** 2
    common = dict(patch_size=vc["patch_size"], temporal_patch_size=vc["temporal_patch_size"],
                  merge_size=vc["spatial_merge_size"], image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  processor_class="Qwen3VLProcessor")
    image = dict(common, size=dict(shortest_edge=int(65536 * scale), longest_edge=int(16777216 * scale)),
                 image_processor_type="Qwen2VLImageProcessorFast")
    video = dict(common, size=dict(shortest_edge=int(4096 * scale), longest_edge=int(25165824 * scale)),
                 video_processor_type="Qwen3VLVideoProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


def random_quantized(shape: tuple[int, ...], qcfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random codes and scales whose dequantized weights have std ~ 1/sqrt(fan_in), made directly, in CPU
    memory. The codes are drawn on g's device (a GPU draws gigabytes at once; the CPU's generator is serial)."""
    from .ops.qformat import quantized_shapes

    parts = quantized_shapes(shape, qcfg)
    K = shape[-1]
    q = torch.randint(0, 256, parts[".q"], generator=g, device=g.device, dtype=torch.uint8).cpu()
    if qcfg.method == "int8":
        return {".q": q.view(torch.int8), ".scale": torch.full(parts[".scale"], 1 / (73 * math.sqrt(K)))}
    scale = torch.full(parts[".scale"], 1 / (4.6 * math.sqrt(K)))
    return {".q": q, ".scale": scale, ".min": -7.5 * scale}


def write_streamed_text(out: Path, tc: dict, seed: int, qcfg, prefix: str, shard_bytes: int = 2 << 30,
                        mtp: bool = False, dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> None:
    """The text model (and the MTP head), one layer in memory at a time, streamed shard by shard: in
    qwen36's quantized form when qcfg is given (the MTP head under our fused names), else plain `dtype`
    tensors in the official layout (per-expert MTP experts), which llama.cpp's converter reads."""
    from .quant import is_quantized

    g = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(out, shard_bytes)

    def put(name: str, t: torch.Tensor) -> None:
        ours = name[len(prefix):] if name.startswith(prefix) else name
        if qcfg is not None and (is_quantized(ours) or name == "mtp.fc.weight"):
            for part, v in random_quantized(tuple(t.shape), qcfg, g).items():
                writer.add(name + part, v)
        else:
            writer.add(name, t if name.endswith(KEEP_FP32) else t.to(dtype))

    from tqdm import tqdm

    bar = tqdm(total=len(tc["layer_types"]), desc="writing layers", unit=" layers", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for part, group in text_layout(tc, prefix, mtp):
        # a group's float weights are drawn before its quantized codes (one layer in memory at a time)
        tensors = _draw(group, g, _SHAPE_ONLY if qcfg is not None else ())
        for name, t in (_per_expert(tensors) if part == "mtp" and qcfg is None else tensors).items():
            put(name, t)
        bar.update(part == "layer")
    bar.close()
    writer.close()


class _ShardWriter:
    """Writes tensors to numbered shards as they come, then names them -of-N and writes the index."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.buf[name] = t.contiguous()
        if sum(v.numel() * v.element_size() for v in self.buf.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            save_file(self.buf, str(self.out / f"part-{len(self.files)}.safetensors"), metadata={"format": "pt"})
            self.total += sum(v.numel() * v.element_size() for v in self.buf.values())
            self.files.append(list(self.buf))
            self.buf = {}

    def close(self) -> None:
        self.flush()
        n, weight_map = len(self.files), {}
        for k, names in enumerate(self.files):
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{k}.safetensors").rename(self.out / name)
            weight_map.update({t: name for t in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- block FP8
# The weights Qwen's -FP8 checkpoints store as float8_e4m3fn + `_scale_inv` (everything else stays as in the bf16
# checkpoint: embeddings, lm_head, the router `mlp.gate`, `shared_expert_gate`, DeltaNet's in_proj_a/b, conv1d,
# A_log, dt_bias, norms, `mtp.fc` and the whole vision tower). Routed experts are stored per expert.
FP8_CONVERTED = re.compile(r"^(model\.language_model\.|model\.|mtp\.)layers\.\d+\.("
                           r"self_attn\.[qkvo]_proj|linear_attn\.(in_proj_qkv|in_proj_z|out_proj)|"
                           r"mlp\.shared_expert\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
FP8_MAX = 448.0                      # the largest float8_e4m3fn


def quantize_fp8(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.bfloat16):
    """w [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv [..., ceil(N/bn), ceil(K/bk)] in scale_dtype):
    each block's largest |w| maps to 448, and w ~= fp8 * scale_inv. The codes are computed from the scale as
    stored (rounded to scale_dtype), so dequantizing gives the nearest FP8 grid point of each weight."""
    w = w.float()
    *lead, N, K = w.shape
    bn, bk = block
    n, k = -(-N // bn), -(-K // bk)
    padded = torch.zeros(*lead, n * bn, k * bk)
    padded[..., :N, :K] = w
    blocks = padded.reshape(*lead, n, bn, k, bk)
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(1e-12).to(scale_dtype)      # [..., n, k]
    q = (blocks / scale.float()[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, n * bn, k * bk)[..., :N, :K].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def to_fp8_checkpoint(src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128),
                      scale_dtype: torch.dtype = torch.bfloat16, per_expert: bool = True, shards: int = 2) -> Path:
    """Convert a float checkpoint in the official layout (e.g. one `write_checkpoint` made) into Qwen's block-FP8
    layout: the FP8_CONVERTED weights become float8_e4m3fn `W` + `W_scale_inv` (block scales, scale_dtype;
    Qwen's are bf16), fused experts are split per expert first (per_expert=False keeps them fused, with a
    [E, ceil(2I/bn), ceil(H/bk)] scale), and config.json gets the `quant_method: fp8` quantization_config.
    The other files (tokenizer, generation config, ...) are copied."""
    from .checkpoint import INDEX_FILE, Checkpoint

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(src)
    tensors: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        t = ckpt.tensor(name)
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if m and per_expert:
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    I = t.shape[1] // 2
                    tensors[f"{m.group(1)}.{e}.gate_proj.weight"] = t[e, :I]
                    tensors[f"{m.group(1)}.{e}.up_proj.weight"] = t[e, I:]
                else:
                    tensors[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
        else:
            tensors[name] = t
    written, not_converted = {}, []
    for name, t in tensors.items():
        if FP8_CONVERTED.match(name) or (not per_expert and re.search(r"\.mlp\.experts\.(gate_up|down)_proj$", name)):
            written[name], written[name + "_scale_inv"] = quantize_fp8(t, block, scale_dtype)
        else:
            written[name] = t
            if name.endswith(".weight") and t.dim() >= 2:
                not_converted.append(name.removesuffix(".weight"))
    write_safetensors(written, out, shards)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=list(block), modules_to_not_convert=not_converted)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _copy_side_files(src, out, skip=("config.json", INDEX_FILE))
    return out


def write_dequantized(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float32, shards: int = 2) -> Path:
    """The float checkpoint an FP8 one stands for: every FP8 weight dequantized (fp32 products, then `dtype`),
    the rest as stored, config.json without the quantization_config."""
    from .checkpoint import INDEX_FILE, Checkpoint

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(src)
    write_safetensors({n: ckpt.read(n, dtype) if n in ckpt.fp8 else ckpt.tensor(n) for n in ckpt.names()}, out, shards)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _copy_side_files(src, out, skip=("config.json", INDEX_FILE))
    return out


def _copy_side_files(src: Path, out: Path, skip: tuple[str, ...]) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy(f, out / f.name)
