"""The multi-token-prediction (MTP) head, `mtp.*` in the checkpoint: drafts tokens for speculative decoding.

It predicts token t+2 from the main model's final-normed hidden state h_t and the embedding of token t+1
(architecture_math.md §10, as vLLM's qwen3_5_mtp runs it):
  u = fc( [ RMSNorm(embed(x_{t+1}); pre_fc_norm_embedding) , RMSNorm(h_t; pre_fc_norm_hidden) ] )   # embedding first
  u = DecoderLayer(full attention + MoE, mtp.layers.0.*, its own KV cache, RoPE at position t)
  g = RMSNorm(u; norm)        logits = lm_head(g)      (embed_tokens and lm_head are the main model's)
Drafting k tokens feeds g back as the next step's hidden state.

Where its KV lives: the engine gives the head an attention layer in the hybrid cache (index
num_hidden_layers) and stores the entry of the pair (h_{r-1}, x_r) in row r of the sequence's block table.
Row r then depends only on tokens 0..r, so a full block is fixed by its content like every other layer's
(the prefix cache shares it), and row 0 is never used. The hidden state of a sequence's last computed
position, which the next row needs, is kept per sequence slot ("hidden").
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import ForwardBatch
from .checkpoint import Checkpoint
from .config import ModelConfig, TextConfig
from .layers.linear import Linear
from .layers.norm import RMSNorm


class MTPHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        from .model import DecoderLayer
        H = cfg.hidden_size
        self.fc = Linear(2 * H, H)
        self.pre_fc_norm_embedding = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, cfg.rms_norm_eps)
        self.layers = nn.ModuleList([DecoderLayer(cfg, None)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, rope, batch: ForwardBatch,
                cache: dict[str, torch.Tensor]) -> torch.Tensor:
        """emb [N, H] embeddings of the tokens x_r, hidden [N, H] the states h_{r-1} -> g [N, H] (normed)."""
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(hidden.to(emb.dtype))], -1))
        return self.norm(self.layers[0](u, rope, batch, cache))


def _fc_target(head: MTPHead, qcfg) -> dict:
    """fc [H, 2H] is the head's largest dense weight: quantize it with the rest (quant.is_quantized does not
    name it, as no decoder weight is called fc)."""
    from .quant import QuantLinear
    q = QuantLinear(head.fc.weight.shape[1], head.fc.weight.shape[0], qcfg)
    head.fc = q
    return {"fc.weight": (q, "weight")}


def load_mtp(cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device, qcfg) -> MTPHead:
    """The checkpoint's `mtp.*` head (per-expert or fused experts), quantized like the decoder."""
    from .checkpoint import CheckpointError
    from .model import _read_weights
    if cfg.text.mtp_num_hidden_layers < 1 or not any(n.startswith("mtp.") for n in ckpt.names()):
        raise CheckpointError(f"{ckpt.path}: speculative decoding with method 'mtp' needs the checkpoint's "
                              "mtp.* weights (the multi-token-prediction head), and this checkpoint has none")
    if cfg.text.mtp_num_hidden_layers != 1:
        raise CheckpointError(f"{ckpt.path}: mtp_num_hidden_layers={cfg.text.mtp_num_hidden_layers}; "
                              "only the one-layer MTP head of Qwen3.5/3.6 is supported")
    with torch.device("meta"):
        head = MTPHead(cfg.text)
    tensors, _ = _read_weights(head, ckpt, cfg, qcfg, dtype, device, part="mtp", extra_targets=_fc_target)
    head.load_state_dict(tensors, strict=True, assign=True)
    head.requires_grad_(False)
    return head


MAX_SPECULATIVE_TOKENS = 8
METHODS = ("mtp",)


class DraftHead:
    """Greedy drafts from the head's output g [M, H]: the argmax of the output head's logits, over the
    whole vocabulary, or over a draft vocabulary (the first N ids, which byte-level BPE ranks by merge
    order, roughly by frequency, plus the special tokens; 93 % of the tokens of English code and prose have
    ids below 32,768). The output head is most of a draft's cost on a CPU (its 248,320 rows are 254 MB in
    int4); a smaller draft vocabulary reads fewer of them. It can only lower acceptance, never change the
    output: drafts are verified."""

    def __init__(self, lm_head: nn.Module, vocab: int, draft_vocab: int | None = None, extra_ids=()):
        self.lm_head, self.ids, self.sub = lm_head, None, None
        if draft_vocab is not None and draft_vocab < vocab:
            ids = sorted(set(range(draft_vocab)) | {i for i in extra_ids if 0 <= i < vocab})
            self.ids = torch.tensor(ids)
            from .quant import QuantLinear
            if isinstance(lm_head, QuantLinear):          # its packed rows, gathered once
                self.sub = {k: v.index_select(0, self.ids).contiguous() for k, v in lm_head.packed.items()}
            else:
                self.sub = lm_head.weight.index_select(0, self.ids)

    def __call__(self, g: torch.Tensor) -> list[int]:
        from .sampling import greedy
        if self.ids is None:
            return greedy(self.lm_head(g))
        from . import kernels
        logits = kernels.qlinear(g, self.sub) if isinstance(self.sub, dict) else kernels.float_linear(g, self.sub)
        return self.ids[torch.tensor(greedy(logits))].tolist()


def speculative_tokens(config) -> int:
    """vLLM's speculative_config ({"method": "mtp", "num_speculative_tokens": k}, a dict or its JSON text;
    None: off) -> k, the tokens drafted per step (0: off). Raises ValueError naming what is wrong."""
    return parse_speculative_config(config)[0]


def parse_speculative_config(config) -> tuple[int, int | None]:
    """speculative_config -> (k, draft vocabulary size or None for the whole vocabulary). Besides vLLM's
    keys, "draft_vocab_size": N drafts among the first N token ids and the special tokens (DraftHead)."""
    import json
    if config is None:
        return 0, None
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("speculative_config must be an object such as "
                         '{"method": "mtp", "num_speculative_tokens": 2}')
    unknown = sorted(set(config) - {"method", "num_speculative_tokens", "draft_vocab_size"})
    if unknown:
        raise ValueError(f"speculative_config: unsupported field(s) {unknown}; "
                         "qwen36 takes 'method', 'num_speculative_tokens' and 'draft_vocab_size'")
    method = config.get("method", "mtp")
    if method not in METHODS:
        raise ValueError(f"speculative_config.method={method!r} is not supported; choose one of {list(METHODS)} "
                         "(the checkpoint's own multi-token-prediction head)")
    k = config.get("num_speculative_tokens", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative_config.num_speculative_tokens={k!r}: must be an integer in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}]")
    n = config.get("draft_vocab_size")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 256):
        raise ValueError(f"speculative_config.draft_vocab_size={n!r}: must be an integer >= 256")
    return k, n
