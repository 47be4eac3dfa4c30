"""The engine: requests in, tokens and text out, every active request in one batched forward per step.

A request's life: waiting -> (slot + KV blocks reserved) running: prompt prefilled in chunks, then one
token per step -> finished (eos / stop token / stop string / max_tokens / aborted), its slot and blocks
freed at once. Text is detokenized incrementally; text that could be the start of a stop string is held
back until it cannot be.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .batch import ForwardBatch, text_positions
from .cache import HybridCache
from .model import TextModel
from .multimodal import MultimodalPrompt
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, SeqState
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]               # tokens appended this step (0 or 1)
    text: str                          # text released this step
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    logprobs: list[dict] = field(default_factory=list)   # per token: {"token_id", "logprob", "top": [(id, lp)]}


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seq: SeqState
    sampler: Sampler
    decoder: StreamDecoder | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""                     # all decoded text
    released: int = 0                  # len of text already handed out
    finish_reason: str | None = None
    force_trigger: int | None = None   # once this token is sampled, force_ids follow (tool_choice forcing)
    force_ids: list[int] = field(default_factory=list)
    forcing: list[int] = field(default_factory=list)   # forced tokens still to emit
    mm: MultimodalPrompt | None = None # image/video embeddings and mRoPE positions of the prompt


class Engine:
    def __init__(self, model: TextModel, tokenizer: Tokenizer | None, eos_token_ids=(), num_slots: int = 8,
                 max_model_len: int | None = None, kv_cache_bytes: int = 1 << 30, block_size: int = 64,
                 token_budget: int = 512):
        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos_token_ids)
        self.device = model.embed_tokens.weight.device
        cfg = model.cfg
        max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        layout = model.cache_layout()
        per_block = HybridCache(layout, 0, 1, block_size, model.compute_dtype, "meta").bytes_per_block()
        num_blocks = max(1, min(kv_cache_bytes // max(per_block, 1), num_slots * -(-max_model_len // block_size)))
        self.cache = HybridCache(layout, num_slots, num_blocks, block_size, model.compute_dtype, self.device)
        self.scheduler = Scheduler(num_slots, num_blocks, block_size, max(token_budget, num_slots), max_model_len)
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    force: tuple[int | None, list[int]] | None = None, mm: MultimodalPrompt | None = None) -> str:
        """force = (trigger token or None, token ids): emit these tokens right after the trigger is sampled
        (or first of all when the trigger is None) instead of sampling them. mm: the prompt's images/videos."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens: give at least one")
        if mm is not None and mm.positions.shape[1] != len(prompt_ids):
            raise ValueError(f"multimodal positions cover {mm.positions.shape[1]} tokens, the prompt has {len(prompt_ids)}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the checkpoint's tokenizer files")
        n = next(self._ids)
        rid = request_id or f"req-{n}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = SeqState(seq_id=n, prompt_len=len(prompt_ids), max_tokens=params.max_tokens)
        self.scheduler.add(seq)                       # raises ValueError naming the lengths if it can never fit
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        req = Request(rid, list(prompt_ids), params, seq, Sampler(params, self.device), decoder, mm=mm)
        if force is not None:
            req.force_trigger, req.force_ids = force[0], list(force[1])
            if force[0] is None:
                req.forcing, req.force_ids = list(force[1]), []
        self.requests[rid] = req
        return rid

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req.seq)

    def has_work(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        work, admitted = self.scheduler.schedule()
        for seq in admitted:
            self.cache.reset(seq.slot)
        if not work:
            return []
        by_seq = {r.seq.seq_id: r for r in self.requests.values()}
        reqs = [by_seq[w.seq.seq_id] for w in work]
        tokens, rows, positions = [], [], []
        for w, r in zip(work, reqs):
            start = w.seq.num_computed
            tokens.extend((r.prompt_ids + r.output_ids)[start:start + w.num_new])
            positions.append(r.mm.positions_for(start, w.num_new) if r.mm is not None
                             else text_positions(start, w.num_new))
            if w.samples:
                rows.append(len(tokens) - 1)
        batch = ForwardBatch.build([w.seq.slot for w in work], [w.seq.num_computed for w in work],
                                   [w.num_new for w in work], [w.seq.blocks for w in work],
                                   self.cache.block_size, logits=rows, positions=torch.cat(positions, dim=1),
                                   device=self.device)
        x = self.model.embed(torch.tensor(tokens, device=self.device))
        for w, r, offset in zip(work, reqs, batch.cu):
            if r.mm is not None:
                r.mm.scatter_into(x, w.seq.num_computed, w.num_new, offset)
        logits = self.model(x, batch, self.cache)
        outputs, k = [], 0
        for w, r in zip(work, reqs):
            w.seq.num_computed += w.num_new
            if w.samples:
                outputs.append(self._sample(r, logits[k]))
                k += 1
        return outputs

    def _sample(self, r: Request, logits: torch.Tensor) -> StepOutput:
        p = r.params
        if r.forcing:
            tok = r.forcing.pop(0)
        else:
            tok = r.sampler(logits, r.prompt_ids, r.output_ids)
            if r.force_ids and tok == r.force_trigger:
                r.forcing, r.force_ids = r.force_ids, []
        logprobs = []
        if p.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs.append({"token_id": tok, "logprob": float(lp[tok]),
                             "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []})
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(r, "stop", [], logprobs)
        r.output_ids.append(tok)
        r.seq.num_tokens += 1
        if r.decoder is not None:
            r.text += r.decoder.feed(tok)
            cut = _find_stop(r.text, p.stop, r.released)
            if cut is not None:
                r.text = r.text[:cut]
                return self._finish(r, "stop", [tok], logprobs, flush=False)
        if len(r.output_ids) >= p.max_tokens:
            return self._finish(r, "length", [tok], logprobs)
        hold = max((len(s) for s in p.stop), default=1) - 1            # a stop string may still be forming
        upto = max(r.released, len(r.text) - hold)
        delta, r.released = r.text[r.released:upto], upto
        return StepOutput(r.request_id, [tok], delta, logprobs=logprobs)

    def _finish(self, r: Request, reason: str, toks: list[int], logprobs, flush: bool = True) -> StepOutput:
        if flush and r.decoder is not None:
            r.text += r.decoder.finish()
            cut = _find_stop(r.text, r.params.stop, r.released)
            if cut is not None:
                r.text, reason = r.text[:cut], "stop"
        delta = r.text[r.released:]
        r.released, r.finish_reason = len(r.text), reason
        self.scheduler.finish(r.seq)
        del self.requests[r.request_id]
        return StepOutput(r.request_id, toks, delta, True, reason, logprobs)


def _find_stop(text: str, stops, released: int) -> int | None:
    """Earliest stop string in text that ends after `released` (earlier text was already checked)."""
    if not stops:
        return None
    lo = max(0, released - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else None
