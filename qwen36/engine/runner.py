"""The model runner: the engine's caches, and one batched forward of a step's scheduled work.

It allocates what the model computes into: the hybrid cache (KV blocks + per-slot DeltaNet states) sized from
the KV budget, the per-draft DeltaNet states speculation rolls back to (`spec_*`), the prefix cache's state
snapshots, and the CUDA graphs' scratch slot and block. `forward` assembles the step's tokens, positions and
block tables into a ForwardBatch, embeds them (image and video rows take their embeddings) and runs the model:
eagerly, with the hidden states the MTP head needs, or as a replayed CUDA graph.
"""
from __future__ import annotations

import torch

from .. import hugepages
from ..batch import ForwardBatch, text_positions
from ..cache import HybridCache, SnapshotStore
from ..model import TextModel
from .config import GiB, EngineConfig
from .cuda_graphs import DecodeGraphs
from .request import Request
from .scheduler import SeqState


class ModelRunner:
    def __init__(self, model: TextModel, config: EngineConfig, spec_k: int):
        self.model, self.device = model, model.embed_tokens.weight.device
        cfg, num_slots, block_size = model.cfg, config.max_num_seqs, config.block_size
        kv_cache_memory = GiB if config.kv_cache_memory is None else config.kv_cache_memory
        # KV rows in config.kv_cache_dtype ("auto": the compute dtype; int8 adds per-token, per-head scales)
        layout = model.cache_layout(mtp=spec_k > 0, kv_dtype=config.kv_cache_dtype)
        per_block = HybridCache(layout, 0, 1, block_size, model.compute_dtype, "meta").bytes_per_block()
        # no max_model_len: what the KV budget holds, up to the model's context (native, or as rope scaling extends it)
        capacity = max(1, kv_cache_memory // max(per_block, 1)) * block_size
        self.max_model_len = min(config.max_model_len or capacity, cfg.max_context)
        self.num_blocks = max(1, min(kv_cache_memory // max(per_block, 1),
                                     num_slots * -(-self.max_model_len // block_size)))
        # cuda_graphs: plain decode steps replay CUDA graphs (cuda_graphs.py), whose padding rows use one slot and
        # one block past the scheduler's (no graphs with speculation: its steps verify drafts)
        graphs = config.cuda_graphs and not spec_k
        self.cache = HybridCache(layout, num_slots + graphs, self.num_blocks + graphs, block_size,
                                 model.compute_dtype, self.device)
        self.graphs = DecodeGraphs(model, self.cache, num_slots, self.num_blocks,
                                   capture=self.device.type == "cuda") if graphs else None
        if spec_k:          # per slot: the DeltaNet states after each draft (empty: pages touched when used)
            for tensors in self.cache.layers.values():
                for name in ("conv", "state"):
                    if name in tensors:
                        t = tensors[name]
                        tensors["spec_" + name] = hugepages.zeros((num_slots, spec_k, *t.shape[1:]), t.dtype,
                                                                  t.device)
        self.snapshot_bytes = SnapshotStore.bytes_per_slot(self.cache)
        prefix_cache_memory = GiB if config.prefix_cache_memory is None else config.prefix_cache_memory
        self.num_snapshots = prefix_cache_memory // self.snapshot_bytes if config.enable_prefix_caching else 0
        self.snapshots = SnapshotStore(self.cache, self.num_snapshots) if self.num_snapshots else None

    # ---------------------------------------------------------------- slots
    def tail_rows(self, seq: SeqState, pos: int) -> torch.Tensor:
        """KV-cache rows of positions pos//B*B .. pos-1 of seq (the partial last block)."""
        B = self.cache.block_size
        return seq.blocks[pos // B] * B + torch.arange(pos % B, device=self.device) if pos % B else \
            torch.empty(0, dtype=torch.long, device=self.device)

    def start(self, seq: SeqState) -> None:
        """A newly admitted sequence: zero its states, or copy in the snapshot it starts from."""
        if seq.restore is None:
            self.cache.reset(seq.slot)
            return
        self.snapshots.restore(seq.restore.slot, seq.slot, self.tail_rows(seq, seq.cached))
        seq.restore.pins -= 1
        seq.restore = None

    def rewind(self, slot: int, j: int) -> None:
        """The slot's DeltaNet states back to those after token j of the last verification chunk."""
        for tensors in self.cache.layers.values():
            if "spec_state" in tensors:
                tensors["state"][slot] = tensors["spec_state"][slot, j]
                tensors["conv"][slot] = tensors["spec_conv"][slot, j]

    # ---------------------------------------------------------------- the forward
    def forward(self, work: list, reqs: list[Request], captures: list, hidden: bool):
        """The batched forward of the scheduled items: (logits of the sampled rows, hidden states or None, the
        batch, each item's drafts, each item's start). captures: each item's prefix-cache snapshot captures
        (the layers write those states as they pass the positions)."""
        tokens, rows, positions, drafts, starts = [], [], [], [], []
        for w, r in zip(work, reqs):
            seq = w.seq
            start, d = seq.num_computed, (seq.drafts if w.samples else [])
            seq.drafts = []
            starts.append(start)
            drafts.append(d)
            tokens.extend((r.prompt_ids + r.output_ids)[start:start + w.num_new - len(d)] + d)
            positions.append(r.mm.positions_for(start, w.num_new) if r.mm is not None
                             else text_positions(start, w.num_new))
            if w.samples:                  # the last known token's position, and every draft's
                rows.extend(range(len(tokens) - 1 - len(d), len(tokens)))
        for w, r in zip(work, reqs):        # grammar masks are computed on a thread while the forward runs
            if w.samples and r.guide is not None:
                r.guide.prefetch(self.model.cfg.vocab_size)
        batch = ForwardBatch.build([w.seq.slot for w in work], starts, [w.num_new for w in work],
                                   [w.seq.blocks for w in work], self.cache.block_size, logits=rows,
                                   positions=torch.cat(positions, dim=1), device=self.device, captures=captures,
                                   keep=[len(d) for d in drafts])
        x = self.model.embed(torch.tensor(tokens, device=self.device))
        for w, r, offset in zip(work, reqs, batch.cu):
            if r.mm is not None:
                r.mm.scatter_into(x, w.seq.num_computed, w.num_new, offset)
        if hidden:
            logits, h = self.model(x, batch, self.cache, hidden=True)
        elif self.graphs is not None and self.graphs.applies(batch):
            logits, h = self.graphs(x, batch), None
        else:
            logits, h = self.model(x, batch, self.cache), None
        return logits, h, batch, drafts, starts
