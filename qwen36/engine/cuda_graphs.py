"""Decode steps replayed as CUDA graphs (a pass over the unchanged model, chosen by an explicit option).

A decode step of B sequences launches a few hundred small kernels; at batch 1 on a GPU their launch cost, not
the weights' read, sets the step time. A CUDA graph records the step's kernels once and replays them with one
launch. A graph fixes its shapes and the addresses it reads, so each graph serves one key:

  Bp  the batch padded up to one of SIZES (padding rows decode a dummy token in the scratch slot)
  L   each sequence's KV rows padded up to a power of two (at least MIN_L): rows past a sequence's length are
      masked (ops.attention.decode_attention), so one graph serves every length up to L

and reads its inputs from static buffers that each step fills first: embeddings x [Bp, H], mRoPE positions
[3, Bp], DeltaNet slots [Bp], KV tables [Bp, L] and lengths [Bp]. The scratch slot and the scratch KV block are
one extra slot and one extra block of the cache that the scheduler never hands out (Engine reserves them).

What the captured step may not do is what the meta-device test rules out (tests/test_gpu_path.py): read a value
on the host, or build a tensor from host data. Steps that need more than the plain decode (prefix-cache
snapshots, speculative verification, the MTP head's hidden states, more than max(SIZES) sequences) run eagerly.
With capture=False (no GPU) the same static-buffer step runs without a graph: what the tests compare.
"""
from __future__ import annotations

import torch

from ..batch import ForwardBatch
from ..cache import HybridCache

SIZES = (1, 2, 4, 8, 16, 32, 64)
MIN_L = 256


class _Graph:
    """One key's static buffers, its ForwardBatch over them, and its graph (None: run without capture)."""

    def __init__(self, model, Bp: int, L: int, scratch_slot: int, scratch_row: int, device):
        H = model.cfg.hidden_size
        self.x = torch.zeros(Bp, H, dtype=model.compute_dtype, device=device)
        self.positions = torch.zeros(3, Bp, dtype=torch.long, device=device)
        self.slots = torch.full((Bp,), scratch_slot, dtype=torch.long, device=device)
        self.table = torch.full((Bp, L), scratch_row, dtype=torch.long, device=device)
        self.lens = torch.ones(Bp, dtype=torch.long, device=device)
        # host-side metadata of a plain decode step of Bp sequences; every tensor the decode path reads is a
        # static buffer (slot_tensor, kv_table, kv_lens are cached properties, set here)
        self.batch = ForwardBatch(tuple(range(Bp)), (0,) * Bp, (1,) * Bp, self.positions,
                                  torch.arange(Bp, device=device), tuple(self.table[i, :1] for i in range(Bp)))
        self.batch.__dict__.update(slot_tensor=self.slots, kv_table=self.table, kv_lens=self.lens)
        self.out: torch.Tensor | None = None
        self.graph = None


def obstacle(model) -> str | None:
    """Why the model's decode step cannot be recorded as a graph (None: it can)."""
    if model.embed_tokens.weight.device.type == "cpu" and model.backend.native is not None:
        return "the CPU kernels read per-sequence host metadata that a static batch does not carry"
    if any(getattr(layer.mlp.experts, "offloaded", False) for layer in model.layers):
        return "the offloaded experts (cpu_experts) run on the CPU, outside a graph"
    if model.embed_tokens.weight.device.type == "cuda" and model.compute_dtype != torch.bfloat16:
        return ("the routed experts' grouped GEMM takes bf16 (in other dtypes they loop over the used experts, "
                "reading their counts on the host)")
    return None


class DecodeGraphs:
    def __init__(self, model, cache: HybridCache, scratch_slot: int, scratch_block: int, capture: bool):
        why = obstacle(model)
        if why is not None:
            raise ValueError(f"cuda_graphs: {why}")
        self.model, self.cache, self.capture = model, cache, capture
        self.scratch_slot, self.scratch_row = scratch_slot, scratch_block * cache.block_size
        self.device = model.embed_tokens.weight.device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0                                     # steps served (the tests count them)

    @staticmethod
    def key(B: int, max_len: int) -> tuple[int, int]:
        Bp = next(s for s in SIZES if s >= B)
        return Bp, max(MIN_L, 1 << (max_len - 1).bit_length())

    def applies(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and len(batch.slots) <= SIZES[-1] and not any(batch.captures) and not batch.keep

    def __call__(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [B, H] the step's embeddings -> logits [B, V] (fp32), as model(x, batch, cache) gives them."""
        B = x.shape[0]
        g = self._get(*self.key(B, max(len(r) for r in batch.kv_rows)))
        self._fill(g, x, batch)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = self.model(g.x, g.batch, self.cache)
        self.replays += 1
        return g.out[:B].clone()

    def _fill(self, g: _Graph, x: torch.Tensor, batch: ForwardBatch) -> None:
        B = x.shape[0]
        g.x[:B] = x
        g.x[B:] = 0
        g.positions[:, :B] = batch.positions
        g.positions[:, B:] = 0
        g.slots[:B] = batch.slot_tensor
        g.slots[B:] = self.scratch_slot
        table = batch.kv_table
        g.table[:B, :table.shape[1]] = table
        g.table[:B, table.shape[1]:] = self.scratch_row
        g.table[B:] = self.scratch_row
        g.lens[:B] = batch.kv_lens
        g.lens[B:] = 1

    def _get(self, Bp: int, L: int) -> _Graph:
        g = self.graphs.get((Bp, L))
        if g is None:
            g = self.graphs[Bp, L] = _Graph(self.model, Bp, L, self.scratch_slot, self.scratch_row, self.device)
            if self.capture:
                self._record(g)
        return g

    @torch.inference_mode()
    def _record(self, g: _Graph) -> None:
        """Warm up on a side stream (first-call allocations and kernel choices happen outside the graph), then
        record. The buffers point at the scratch slot and block: the warm-up writes nothing a sequence owns."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(g.x, g.batch, self.cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        g.graph = torch.cuda.CUDAGraph()
        # thread_local: work another thread puts on the GPU meanwhile (the server's media preprocessing) does not
        # invalidate the capture
        with torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode="thread_local"):
            g.out = self.model(g.x, g.batch, self.cache)
