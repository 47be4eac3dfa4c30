"""The qwen3_5_moe text decoder, top to bottom.

  x = embed_tokens[ids]
  for each layer:  x = x + Mixer(RMSNorm(x))        Mixer = GatedDeltaNet or GatedAttention (layer_types)
                   x = x + SparseMoE(RMSNorm(x))
  logits = lm_head(RMSNorm(x))                      untied head, no scaling
All RMSNorms here are zero-centred (1 + w). Shapes: N flattened tokens of the step, H hidden size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import hugepages
from .batch import ForwardBatch
from .cache import HybridCache, Layout
from .checkpoint import Checkpoint, disk_names_for, iter_text_weights
from .config import ModelConfig, TextConfig, load_config
from .layers.attention import GatedAttention
from .layers.deltanet import GatedDeltaNet
from .layers.fastpath import plan_for
from .layers.linear import Linear
from .layers.moe import SparseMoE
from .layers.norm import RMSNorm
from .layers.rotary import MRotary
from .quant import DEFAULT_GROUP, METHODS, QuantConfig, offload_experts, quantize, quantize_modules, quantized_shapes

# fp32 on disk and tiny: kept in fp32 whatever the storage dtype (the decay and the gated norm)
KEEP_FP32 = ("linear_attn.A_log", "linear_attn.norm.weight")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int | None):
        """index None: a full-attention layer outside the stack (the MTP head's)."""
        super().__init__()
        self.full_attention = index is None or cfg.is_full_attention(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.full_attention:
            self.self_attn = GatedAttention(cfg)
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg)

    def forward(self, x, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]):
        # a CPU decode step as native calls only, the same values (layers/fastpath.py)
        plan = plan_for(self) if x.device.type == "cpu" else None
        if plan is not None and plan.applies(x, batch):
            return plan(x, rope, batch, cache)
        h = self.input_layernorm(x)
        h = self.self_attn(h, rope, batch, cache) if self.full_attention else self.linear_attn(h, batch, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary: MRotary | None = None                                     # set once weights are on a device
        self.compute_dtype = torch.float32
        self.checkpoint: Checkpoint | None = None                             # the open files it was loaded from
        self.mtp = None                    # the MTP head (mtp.MTPHead) when loaded for speculative decoding

    def cache_layout(self, mtp: bool = False) -> Layout:
        """Per layer: name -> (kind, shape of one row, dtype or None for the compute dtype). mtp: add the MTP
        head's attention layer (index num_hidden_layers) and its per-slot last hidden state (mtp.py)."""
        c = self.cfg
        layout = {}
        if mtp:
            kv = ("per_token", (c.num_key_value_heads, c.head_dim), None)
            layout[len(self.layers)] = {"k": kv, "v": kv, "hidden": ("per_slot", (c.hidden_size,), torch.float32)}
        for i, layer in enumerate(self.layers):
            if layer.full_attention:
                kv = ("per_token", (c.num_key_value_heads, c.head_dim), None)
                layout[i] = {"k": kv, "v": kv}
            else:
                layout[i] = {
                    "conv": ("per_slot", (c.linear_conv_kernel_dim - 1, c.linear_conv_dim), None),
                    "state": ("per_slot", (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
                              torch.float32),
                }
        return dict(sorted(layout.items()))

    def new_cache(self, num_slots: int, max_len: int) -> HybridCache:
        """A cache where each slot owns room for max_len tokens (offline use; the engine pages blocks)."""
        return HybridCache.contiguous(self.cache_layout(), num_slots, max_len, self.compute_dtype,
                                      self.embed_tokens.weight.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens.weight).to(self.compute_dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, hidden: bool = False):
        """x [N, H] input embeddings -> logits [len(batch.logits_index), V] in fp32; with hidden=True also
        the final-normed hidden states of all N tokens (what the MTP head reads)."""
        rope = self.rotary.cos_sin(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, batch, cache[i])
        if hidden:
            h = self.norm(x)
            return self.lm_head(h[batch.logits_index]).float(), h
        return self.lm_head(self.norm(x[batch.logits_index])).float()

    def draft(self, x: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch, cache: HybridCache) -> torch.Tensor:
        """The MTP head over MTP rows (see mtp.py): x [N, H] embeddings of tokens x_r, hidden [N, H] states
        h_{r-1}, batch over those rows (positions: RoPE position r - 1) -> the head's normed output g [N, H]
        (mtp.DraftHead turns it into tokens; it is also the next draft's hidden state)."""
        rope = self.rotary.cos_sin(batch.positions, self.compute_dtype)
        return self.mtp(x, hidden, rope, batch, cache[len(self.layers)])


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
               compute_dtype: torch.dtype | None = None, quantization: str | None = None,
               group_size: int = DEFAULT_GROUP, mtp: bool = False,
               cpu_experts: int | str = 0, progress: bool = False) -> tuple[ModelConfig, TextModel]:
    """Build the text model on the meta device and fill it from the checkpoint, one tensor at a time.

    quantization="int8"|"int4" quantizes each weight as it is read (the model never exists in fp32 as a
    whole); a checkpoint written by `qwen36 quantize` is loaded as it is stored, without re-quantizing.
    A block-FP8 checkpoint (Qwen's -FP8, config.fp8) is a source format: each weight is dequantized as it
    is read, into `dtype` or then into int8/int4.
    mtp=True also loads the MTP head (`model.mtp`, for speculative decoding). cpu_experts=N keeps the routed
    experts of the last N layers ("all": every layer) in CPU memory, int4, run by the CPU kernels
    (quant.offload_experts).
    """
    cfg = load_config(path)
    ckpt = Checkpoint(path, fp8_block=cfg.fp8.block if cfg.fp8 else None)
    device = torch.device(device)
    qcfg = _quant_config(cfg, quantization, group_size)
    with torch.device("meta"):
        model = TextModel(cfg.text)
    drop = ("lm_head.weight",) if cfg.text.tie_word_embeddings else ()
    n = cfg.text.num_hidden_layers
    cpu_experts = n if cpu_experts == "all" else cpu_experts
    if not isinstance(cpu_experts, int) or isinstance(cpu_experts, bool) or not 0 <= cpu_experts <= n:
        raise ValueError(f"cpu_experts={cpu_experts!r}: give 'all' or a number of layers from 0 to {n}")
    offload = (lambda m, q: offload_experts(m, range(n - cpu_experts, n), qcfg or QuantConfig("int4", group_size))) \
        if cpu_experts else None
    tensors, targets = _read_weights(model, ckpt, cfg, qcfg, dtype, device, drop=drop, on_cpu=offload,
                                     progress=progress)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in targets:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    elif cfg.text.tie_word_embeddings:
        targets["lm_head.weight"][0].load("weight", quantize(tensors["embed_tokens.weight"], qcfg))
    model.load_state_dict(tensors, strict=True, assign=True)
    prepare(model, device, dtype, compute_dtype)
    model.quantization = qcfg
    model.checkpoint = ckpt             # other parts (the vision tower) are read from the same memory maps
    if mtp:
        from .mtp import load_mtp
        model.mtp = load_mtp(cfg, ckpt, dtype, device, qcfg)
    return cfg, model


def prepare(model: TextModel, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype | None) -> None:
    """What a model needs once its weights are in place (loaded, or made on the device by device_bench)."""
    model.requires_grad_(False)
    model.rotary = MRotary(model.cfg, device)
    if compute_dtype is None:  # CPU: fp32 activations whatever the storage (bf16 matmul is ~500x slower)
        compute_dtype = torch.float32 if device.type == "cpu" else dtype
    model.compute_dtype = compute_dtype
    if device.type == "cpu":
        from .kernels import flush_denormals
        flush_denormals()               # DeltaNet's decays underflow: denormals are ~100x slower (kernels.py)


def _read_weights(module: nn.Module, ckpt: Checkpoint, cfg: ModelConfig, qcfg: QuantConfig | None, dtype, device,
                  drop: tuple[str, ...] = (), part: str = "text",
                  extra_targets=None, on_cpu=None, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Fill `module` (built on the meta device) from the checkpoint, one tensor at a time: quantized weights
    go straight into their modules (quantized as read, or read as stored), the rest are returned by name.
    part: "text" (the decoder) or "mtp" (the `mtp.*` head). extra_targets(module, qcfg) may add weights to
    quantize that the naming rule (quant.is_quantized) does not cover; on_cpu(module, qcfg) likewise adds
    weights that are read, quantized and kept on the CPU whatever `device` is."""
    expected = {name: tuple(p.shape) for name, p in module.state_dict().items() if name not in drop}
    targets = quantize_modules(module, qcfg) if qcfg else {}
    if qcfg and extra_targets is not None:
        targets.update(extra_targets(module, qcfg))
    cpu_targets = on_cpu(module, qcfg) if on_cpu is not None else {}
    targets.update(cpu_targets)
    stored = {name for name in targets if cfg.quantization is not None and _stored_as_parts(ckpt, name, part)}
    for name in stored:                                 # read the stored parts instead of float weights
        for suffix, shape in quantized_shapes(expected.pop(name), qcfg).items():
            expected[name + suffix] = shape
    tensors, parts = {}, {}
    weights = iter_text_weights(ckpt, expected, cfg.text.num_experts, dtype, device, keep_fp32=KEEP_FP32,
                                part=part, on_cpu=frozenset(cpu_targets))
    verb = "loading" if qcfg is None or stored else f"loading + quantizing to {qcfg.method}"
    for name, t in tqdm(weights, total=len(expected), desc=verb, unit=" tensors", disable=not progress,
                        file=sys.stderr, dynamic_ncols=True):
        base, dot, suffix = name.rpartition(".")
        if name in targets:                                    # a float weight to quantize now
            mod, attr = targets[name]
            mod.load(attr, quantize(t, mod.cfg))
            hugepages.release(t)                               # the float weight's file pages, if read in place
        elif base in stored:                                   # a stored part: load once all are read
            parts.setdefault(base, {})[suffix] = t
            if len(parts[base]) == len(quantized_shapes((1, qcfg.group_size * 2), qcfg)):
                mod, attr = targets[base]
                mod.load(attr, parts.pop(base))
        else:
            tensors[name] = t
    if qcfg is not None and torch.device(device).type == "cpu":
        # what stays float in a quantized model is small (router, gates, norms): keep it in fp32 so no
        # step casts it again; the embedding stays as stored (one row is read per token)
        tensors = {k: (v if k == "embed_tokens.weight" else v.float()) for k, v in tensors.items()}
    return tensors, targets


def _stored_as_parts(ckpt: Checkpoint, name: str, part: str) -> bool:
    """Whether a quantized checkpoint holds `name` quantized (a `.q` part) rather than as a float weight
    (our export copies the `mtp.*` head as it was)."""
    return any(d + ".q" in ckpt.where for d in disk_names_for(name, part))


def _quant_config(cfg: ModelConfig, quantization: str | None, group_size: int) -> QuantConfig | None:
    """The quantized form the model takes: the stored one of a `qwen36 quantize` checkpoint, else the one
    asked for (None: float). Block FP8 on disk (cfg.fp8) is not a stored form: it is read as float."""
    stored = QuantConfig.from_json(cfg.quantization) if cfg.quantization is not None else None
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"quantization={quantization!r} is not supported; choose one of {list(METHODS)} or None")
    if stored is not None:
        if quantization is not None and quantization != stored.method:
            raise ValueError(f"this checkpoint is stored quantized as {stored.method}; load it with "
                             f"quantization={stored.method!r} or None, not {quantization!r}")
        return stored
    return QuantConfig(quantization, group_size) if quantization else None
