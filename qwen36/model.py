"""The qwen3_5_moe text decoder, top to bottom.

  x = embed_tokens[ids]
  for each layer:  x = x + Mixer(RMSNorm(x))        Mixer = GatedDeltaNet or GatedAttention (layer_types)
                   x = x + SparseMoE(RMSNorm(x))
  logits = lm_head(RMSNorm(x))                      untied head, no scaling
All RMSNorms here are zero-centred (1 + w). Shapes: N flattened tokens of the step, H hidden size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ForwardBatch
from .cache import HybridCache, Layout
from .checkpoint import Checkpoint, iter_text_weights
from .config import ModelConfig, TextConfig, load_config
from .layers.attention import GatedAttention
from .layers.deltanet import GatedDeltaNet
from .layers.linear import Linear
from .layers.moe import SparseMoE
from .layers.norm import RMSNorm
from .layers.rotary import MRotary
from .quant import DEFAULT_GROUP, METHODS, QuantConfig, quantize, quantize_modules, quantized_shapes

# fp32 on disk and tiny: kept in fp32 whatever the storage dtype (the decay and the gated norm)
KEEP_FP32 = ("linear_attn.A_log", "linear_attn.norm.weight")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.full_attention = cfg.is_full_attention(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.full_attention:
            self.self_attn = GatedAttention(cfg)
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg)

    def forward(self, x, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]):
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

    def cache_layout(self) -> Layout:
        """Per layer: name -> (kind, shape of one row, dtype or None for the compute dtype)."""
        c = self.cfg
        layout = {}
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
        return layout

    def new_cache(self, num_slots: int, max_len: int) -> HybridCache:
        """A cache where each slot owns room for max_len tokens (offline use; the engine pages blocks)."""
        return HybridCache.contiguous(self.cache_layout(), num_slots, max_len, self.compute_dtype,
                                      self.embed_tokens.weight.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens.weight).to(self.compute_dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache) -> torch.Tensor:
        """x [N, H] input embeddings -> logits [len(batch.logits_index), V] in fp32."""
        rope = self.rotary.cos_sin(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, batch, cache[i])
        x = self.norm(x[batch.logits_index])
        return self.lm_head(x).float()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
               compute_dtype: torch.dtype | None = None, quantization: str | None = None,
               group_size: int = DEFAULT_GROUP) -> tuple[ModelConfig, TextModel]:
    """Build the text model on the meta device and fill it from the checkpoint, one tensor at a time.

    quantization="int8"|"int4" quantizes each weight as it is read (the model never exists in fp32 as a
    whole); a checkpoint written by `qwen36 quantize` is loaded as it is stored, without re-quantizing.
    """
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    device = torch.device(device)
    qcfg = _quant_config(cfg, quantization, group_size)
    stored_quantized = cfg.quantization is not None
    with torch.device("meta"):
        model = TextModel(cfg.text)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        expected.pop("lm_head.weight")
    targets = quantize_modules(model, qcfg) if qcfg else {}
    if stored_quantized:  # read the stored parts instead of float weights
        for name in targets:
            for part, shape in quantized_shapes(expected.pop(name), qcfg).items():
                expected[name + part] = shape
    tensors, parts = {}, {}
    for name, t in iter_text_weights(ckpt, expected, cfg.text.num_experts, dtype, device, keep_fp32=KEEP_FP32):
        base, dot, part = name.rpartition(".")
        if name in targets:                                    # a float weight to quantize now
            module, attr = targets[name]
            module.load(attr, quantize(t, qcfg))
        elif stored_quantized and base in targets:             # a stored part: load once all are read
            parts.setdefault(base, {})[part] = t
            if len(parts[base]) == len(quantized_shapes((1, qcfg.group_size * 2), qcfg)):
                module, attr = targets[base]
                module.load(attr, parts.pop(base))
        else:
            tensors[name] = t
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in targets:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    elif cfg.text.tie_word_embeddings:
        targets["lm_head.weight"][0].load("weight", quantize(tensors["embed_tokens.weight"], qcfg))
    if qcfg is not None and device.type == "cpu":
        # what stays float in a quantized model is small (router, gates, norms): keep it in fp32 so no
        # step casts it again; the embedding stays as stored (one row is read per token)
        tensors = {k: (v if k == "embed_tokens.weight" else v.float()) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    model.rotary = MRotary(cfg.text, device)
    if compute_dtype is None:  # CPU: fp32 activations whatever the storage (bf16 matmul is ~500x slower)
        compute_dtype = torch.float32 if device.type == "cpu" else dtype
    model.compute_dtype = compute_dtype
    model.quantization = qcfg
    model.checkpoint = ckpt             # other parts (the vision tower) are read from the same memory maps
    return cfg, model


def _quant_config(cfg: ModelConfig, quantization: str | None, group_size: int) -> QuantConfig | None:
    stored = QuantConfig.from_json(cfg.quantization) if cfg.quantization is not None else None
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"quantization={quantization!r} is not supported; choose one of {list(METHODS)} or None")
    if stored is not None:
        if quantization is not None and quantization != stored.method:
            raise ValueError(f"this checkpoint is stored quantized as {stored.method}; load it with "
                             f"quantization={stored.method!r} or None, not {quantization!r}")
        return stored
    return QuantConfig(quantization, group_size) if quantization else None
