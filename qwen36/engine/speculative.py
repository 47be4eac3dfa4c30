"""Speculative decoding with the checkpoint's MTP head: draft k tokens per decoding sequence after each step.

After a step, the head (mtp.py) runs over every newly computed position whose next token is known, writing
its own KV rows, and drafts up to k tokens for each sequence that goes on decoding. The next step runs the
last token and the drafts as one chunk; the engine core takes the main model's choice at each position in
order (output.advance: the same sampling as without drafts) and stops at the first disagreement, rolling the
DeltaNet states back to the last accepted token (ModelRunner.rewind). Nothing of a rejected draft stays in
any cache.

A `drafter` may replace the drafts: a callable (request, drafts) -> drafts, e.g. the bench's oracle that
measures a step's time against the number of drafts accepted. Outputs never depend on the drafts.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..batch import ForwardBatch, text_positions
from ..model import TextModel
from ..mtp import DraftHead
from .request import Request

Drafter = Callable[[Request, list[int]], list[int]]


class Speculator:
    def __init__(self, model: TextModel, cache, k: int, draft_vocab_size: int | None, special_ids=(),
                 drafter: Drafter | None = None):
        self.model, self.cache, self.max_k, self.k = model, cache, k, k
        self.layer = len(model.layers)                   # the MTP head's index in the cache
        self.head = DraftHead(model.lm_head, model.cfg.vocab_size, draft_vocab_size, special_ids) if k else None
        self.drafter = drafter

    def budget(self, r: Request) -> int:
        """How many tokens r may draft now: k, but no more than its remaining max_tokens allows after the
        token verification always adds (the KV blocks reserved for it hold exactly that)."""
        return min(self.k, r.params.max_tokens - len(r.output_ids) - 1)

    def propose(self, items, hidden: torch.Tensor) -> None:
        """The MTP head over this step's work: write its KV rows for every newly computed position whose next
        token is known, keep each slot's last hidden state, and draft the next tokens of every sequence that
        goes on decoding (set as seq.drafts). items: (request, start, offset of its tokens in the step, the
        output.advance result or None)."""
        device, B = hidden.device, self.cache.block_size
        slot_hidden = self.cache[self.layer]["hidden"]
        ids, hs, slots, lows, lens, tables, pos, logit_rows, drafting, members = [], [], [], [], [], [], [], [], [], []
        for r, start, off, out in items:
            seq = r.seq
            lo, hi = seq.mtp_rows, min(seq.num_computed, seq.num_tokens - 1) + 1
            if hi > lo:
                assert lo >= start, "MTP rows lag behind the sequence"
                known = (r.prompt_ids + r.output_ids)[lo:hi]
                h = hidden[off + max(lo - 1 - start, 0):off + hi - 1 - start]
                if lo == start:                       # row `start` pairs the previous step's last state
                    h = torch.cat([slot_hidden[seq.slot][None].to(h.dtype), h])
                ids.extend(known)
                members.append(r)
                hs.append(h)
                slots.append(seq.slot)
                lows.append(lo)
                lens.append(hi - lo)
                tables.append(seq.blocks)
                pos.append(r.mm.positions_for(lo - 1, hi - lo) if r.mm is not None else text_positions(lo - 1, hi - lo))
                if out is not None and out[2] is None and not seq.prefilling and self.budget(r) > 0:
                    drafting.append((r, len(lens) - 1))
                    logit_rows.append(sum(lens) - 1)
            slot_hidden[seq.slot] = hidden[off + seq.num_computed - 1 - start]
            seq.mtp_rows = max(hi, lo)
        if not lens:
            return
        batch = ForwardBatch.build(slots, lows, lens, tables, B, positions=torch.cat(pos, dim=1), device=device,
                                   first_row=1)
        x = self.model.embed(torch.tensor(ids, device=device))
        for r, lo, n, offset in zip(members, lows, lens, batch.cu):
            if r.mm is not None:             # image and video rows take their embeddings, as in the forward
                r.mm.scatter_into(x, lo, n, offset)
        g = self.model.draft(x, torch.cat(hs), batch, self.cache)
        ends = [c - 1 for c in batch.cu[1:]]
        firsts = self.head(g[logit_rows]) if logit_rows else []
        chains = [[r, [d], g[ends[i]]] for d, (r, i) in zip(firsts, drafting)]
        for step in range(1, self.k):                # each further draft: one row per sequence still drafting
            live = [c for c in chains if len(c[1]) < self.budget(c[0])]
            if not live:
                break
            rows = [r.seq.num_tokens - 1 + step for r, _, _ in live]
            ps = [r.mm.positions_for(row - 1, 1) if r.mm is not None else text_positions(row - 1, 1)
                  for (r, _, _), row in zip(live, rows)]
            batch = ForwardBatch.build([r.seq.slot for r, _, _ in live], rows, [1] * len(live),
                                       [r.seq.blocks for r, _, _ in live], B,
                                       positions=torch.cat(ps, dim=1), device=device, first_row=1)
            x = self.model.embed(torch.tensor([d[-1] for _, d, _ in live], device=device))
            g = self.model.draft(x, torch.stack([h for _, _, h in live]), batch, self.cache)
            for j, (c, d) in enumerate(zip(live, self.head(g))):
                c[1].append(d)
                c[2] = g[j]
        for r, d, _ in chains:
            if r.forcing:                            # tokens that will be forced are the best drafts
                d = (r.forcing + d)[:len(d)]
            if self.drafter is not None:
                d = list(self.drafter(r, d))[:self.budget(r)]
            r.seq.drafts = d
