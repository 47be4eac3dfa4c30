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
from .config import TextConfig
from .layers.linear import Linear
from .layers.norm import RMSNorm
from .layers.quant import QuantLinear
from .model import DecoderLayer
from .ops.linear import linear


class MTPHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
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
    q = QuantLinear(head.fc.weight.shape[1], head.fc.weight.shape[0], qcfg)
    head.fc = q
    return {"fc.weight": (q, "weight")}


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
            w = lm_head.kernel_weight                     # a QuantLinear's packed rows or a float weight's,
            self.sub = {k: v.index_select(0, self.ids).contiguous() for k, v in w.items()} \
                if isinstance(w, dict) else w.index_select(0, self.ids)          # gathered once

    def __call__(self, g: torch.Tensor) -> list[int]:
        if self.ids is None:
            return _argmax(self.lm_head(g))
        return self.ids[torch.tensor(_argmax(linear(g, self.sub, self.lm_head.backend)))].tolist()


def _argmax(logits: torch.Tensor):
    """The first index of the largest logit over the last dim, as sampling.greedy picks it (torch's max
    along a dim returns argmax's index, faster): an int for one row, else a list."""
    idx = logits.max(-1).indices
    return int(idx) if idx.dim() == 0 else idx.tolist()


