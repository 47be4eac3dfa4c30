"""The qwen3_5_moe text decoder, top to bottom.

  x = embed_tokens[ids]
  for each layer:  x = x + Mixer(RMSNorm(x))        Mixer = GatedDeltaNet or GatedAttention (layer_types)
                   x = x + SparseMoE(RMSNorm(x))
  logits = lm_head(RMSNorm(x))                      untied head, no scaling
All RMSNorms here are zero-centred (1 + w). Shapes: N flattened tokens of the step, H hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ForwardBatch
from .cache import HybridCache, Layout, kv_layout, kv_storage
from .checkpoint import Checkpoint
from .config import TextConfig
from .layers.attention import GatedAttention
from .layers.decode_plan import plan_for
from .layers.deltanet import GatedDeltaNet
from .layers.linear import Linear
from .layers.moe import SparseMoE
from .layers.norm import RMSNorm
from .layers.rotary import MRotary
from .ops.backend import Backend, UsesBackend
from .ops.qformat import QuantConfig


class DecoderLayer(UsesBackend, nn.Module):
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
        self.decode_plan = None            # (backend, DecodePlan or None): layers/decode_plan.py, built at first use

    def forward(self, x, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]):
        # a CPU decode step as native calls only, the same values (layers/decode_plan.py)
        plan = plan_for(self, self.backend) if x.device.type == "cpu" else None
        if plan is not None and plan.applies(x, batch):
            return plan(x, rope, batch, cache)
        h = self.input_layernorm(x)
        h = self.self_attn(h, rope, batch, cache) if self.full_attention else self.linear_attn(h, batch, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(UsesBackend, nn.Module):
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
        self.quantization: QuantConfig | None = None                          # the weights' quantized form
        self.mtp = None                    # the MTP head (mtp.MTPHead) when loaded for speculative decoding

    def set_backend(self, backend: Backend) -> None:
        """The compute path of every module (and the MTP head's): resolved once, at load (loader.py)."""
        for module in self.modules():
            if isinstance(module, UsesBackend):
                module.backend = backend

    def cache_layout(self, mtp: bool = False, kv_dtype: str | None = None) -> Layout:
        """Per layer: name -> (kind, shape of one row, dtype or None for the compute dtype). mtp: add the MTP
        head's attention layer (index num_hidden_layers) and its per-slot last hidden state (mtp.py). kv_dtype:
        the KV rows' storage (EngineConfig.kv_cache_dtype; None or "auto": the compute dtype; cache.kv_storage)."""
        c = self.cfg
        kv = kv_layout((c.num_key_value_heads, c.head_dim), kv_storage(kv_dtype, self.compute_dtype))
        layout = {}
        if mtp:
            layout[len(self.layers)] = {**kv, "hidden": ("per_slot", (c.hidden_size,), torch.float32)}
        for i, layer in enumerate(self.layers):
            if layer.full_attention:
                layout[i] = dict(kv)
            else:
                layout[i] = {
                    "conv": ("per_slot", (c.linear_conv_kernel_dim - 1, c.linear_conv_dim), None),
                    "state": ("per_slot", (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
                              torch.float32),
                }
        return dict(sorted(layout.items()))

    def new_cache(self, num_slots: int, max_len: int, kv_dtype: str | None = None) -> HybridCache:
        """A cache where each slot owns room for max_len tokens (offline use; the engine pages blocks)."""
        return HybridCache.contiguous(self.cache_layout(kv_dtype=kv_dtype), num_slots, max_len, self.compute_dtype,
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

