"""The engine: requests in, tokens and text out, every active request in one batched forward per step.

A request's life: waiting -> (slot + KV blocks reserved) running: prompt prefilled in chunks, then one
token per step -> finished (eos / stop token / stop string / max_tokens / aborted), its slot and blocks
freed at once. Text is detokenized incrementally; text that could be the start of a stop string is held
back until it cannot be.

Prefix cache (see prefix_cache.py): a request starts from the deepest cached snapshot of its prompt; while
it runs, the state is saved at its snapshot points (message starts, every `snapshot_every` tokens, the end
of the prompt) and, when it finishes, at the end of what it generated. `warm` queues a background prefill
(no output) that runs only while nothing else does and is cut short, keeping its progress as a snapshot,
as soon as a real request arrives.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from .batch import ForwardBatch, text_positions
from .cache import HybridCache, SnapshotStore
from .model import TextModel
from .multimodal import MultimodalPrompt
from .sampling import Sampler, SamplingParams
from .structured import GrammarBackend, Guide, json_grammar
from .prefix_cache import PrefixKey, snapshot_points
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
    cached_tokens: int = 0             # prompt tokens taken from the prefix cache
    stop_sequence: str | None = None   # the stop string that ended the output (finish_reason "stop")


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
    stop_sequence: str | None = None
    force_trigger: int | None = None   # once this token is sampled, force_ids follow (tool_choice forcing)
    force_ids: list[int] = field(default_factory=list)
    forcing: list[int] = field(default_factory=list)   # forced tokens still to emit
    mm: MultimodalPrompt | None = None # image/video embeddings and mRoPE positions of the prompt
    guide: Guide | None = None         # thinking budget and grammar (structured.py)


@dataclass
class EngineStats:
    prompt_tokens_computed: int = 0     # prompt tokens run through the model (not taken from the cache)
    background_started: int = 0
    background_finished: int = 0
    background_preempted: int = 0


log = logging.getLogger("qwen36.engine")
BOUNDARY_GAP, MAX_BOUNDARIES = 16, 32   # message-start snapshots per prompt: >= 16 tokens apart, the last 32


class Engine:
    def __init__(self, model: TextModel, tokenizer: Tokenizer | None, eos_token_ids=(), num_slots: int = 8,
                 max_model_len: int | None = None, kv_cache_bytes: int = 1 << 30, block_size: int = 64,
                 token_budget: int = 512, enable_prefix_caching: bool = True, prefix_cache_bytes: int = 1 << 30,
                 snapshot_every: int = 4096, grammar: GrammarBackend | None = None):
        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos_token_ids)
        self.device = model.embed_tokens.weight.device
        cfg = model.cfg
        max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        layout = model.cache_layout()
        per_block = HybridCache(layout, 0, 1, block_size, model.compute_dtype, "meta").bytes_per_block()
        num_blocks = max(1, min(kv_cache_bytes // max(per_block, 1), num_slots * -(-max_model_len // block_size)))
        self.cache = HybridCache(layout, num_slots, num_blocks, block_size, model.compute_dtype, self.device)
        self.snapshot_bytes = SnapshotStore.bytes_per_slot(self.cache)
        num_snapshots = prefix_cache_bytes // self.snapshot_bytes if enable_prefix_caching else 0
        self.snapshots = SnapshotStore(self.cache, num_snapshots) if num_snapshots else None
        self.scheduler = Scheduler(num_slots, num_blocks, block_size, max(token_budget, num_slots), max_model_len,
                                   snapshot_slots=num_snapshots)
        self.prefix = self.scheduler.prefix                    # None when prefix caching is off
        self.snapshot_every = snapshot_every
        self.boundary_id = tokenizer.token_id("<|im_start|>") if tokenizer is not None else None
        self.grammar = grammar
        self.stats = EngineStats()
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
        if params.logit_bias and max(params.logit_bias) >= self.model.cfg.vocab_size:
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary "
                             f"(ids 0..{self.model.cfg.vocab_size - 1})")
        n = next(self._ids)
        rid = request_id or f"req-{n}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        # everything that can fail comes before the scheduler holds the sequence: a refused request
        # leaves no trace (an orphaned sequence would fail every later step)
        sampler = Sampler(params, self.device)
        guide = self._guide(prompt_ids, params)
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        seq = self._seq(n, prompt_ids, params.max_tokens, mm)
        self.scheduler.add(seq)                       # raises ValueError naming the lengths if it can never fit
        self._preempt_background()
        req = Request(rid, list(prompt_ids), params, seq, sampler, decoder, mm=mm, guide=guide)
        if force is not None:
            req.force_trigger, req.force_ids = force[0], list(force[1])
            if force[0] is None:
                req.forcing, req.force_ids = list(force[1]), []
        self.requests[rid] = req
        return rid

    def _guide(self, prompt_ids: list[int], params: SamplingParams) -> Guide | None:
        """The request's thinking budget and grammar, if it has either (a bad schema raises ValueError)."""
        if params.json_schema is None and params.grammar is None and params.thinking_token_budget is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured output and thinking budgets need the checkpoint's tokenizer files")
        grammar = params.grammar if params.json_schema is None else json_grammar(params.json_schema)
        if grammar is not None:
            if self.grammar is None:
                raise ValueError("structured output needs the checkpoint's tokenizer.json (llguidance reads it)")
            self.grammar.check(grammar, "grammar" if params.json_schema is None else "JSON schema")
        tk = self.tokenizer
        opened, closed = tk.token_id("<think>"), tk.token_id("</think>")
        tail = list(prompt_ids[-4:])                   # "<think>\n" ends a prompt that leaves the model thinking

        def last(token: int) -> int:
            return max((i for i, t in enumerate(tail) if t == token), default=-1)
        return Guide(self.grammar, grammar, params.thinking_token_budget, last(opened) > last(closed), closed,
                     tk.encode("\n\n"))

    def _seq(self, n: int, prompt_ids: list[int], max_tokens: int, mm: MultimodalPrompt | None,
             background: bool = False) -> SeqState:
        seq = SeqState(seq_id=n, prompt_len=len(prompt_ids), max_tokens=max_tokens, background=background)
        if self.prefix is not None:
            seq.key = PrefixKey(tuple(prompt_ids), mm.spans if mm is not None else ())
            seq.snap_points = tuple(snapshot_points(prompt_ids, 0, self.boundary_id, self.snapshot_every,
                                                    min_gap=BOUNDARY_GAP, max_boundaries=MAX_BOUNDARIES))
        return seq

    def warm(self, prompt_ids: list[int]) -> str | None:
        """Prefill prompt_ids in the background (no output) so that a later request starting with them hits
        the prefix cache. Replaces any earlier background prefill; None if there is nothing to do."""
        if self.prefix is None or not prompt_ids:
            return None
        for rid in [r.request_id for r in self.requests.values() if r.seq.background]:
            self.abort(rid)
        key = PrefixKey(tuple(prompt_ids))
        if len(prompt_ids) + 1 > self.max_model_len or self.prefix.has(key, len(prompt_ids)):
            return None
        n = next(self._ids)
        seq = self._seq(n, prompt_ids, 0, None, background=True)
        try:
            self.scheduler.add(seq)
        except ValueError:
            return None
        rid = f"warm-{n}"
        self.requests[rid] = Request(rid, list(prompt_ids), SamplingParams(temperature=0, max_tokens=1), seq,
                                     Sampler(SamplingParams(temperature=0, max_tokens=1), self.device), None)
        self.stats.background_started += 1
        return rid

    def _preempt_background(self) -> None:
        """A real request arrived: stop background prefills, keeping what they computed as a snapshot."""
        for r in [r for r in self.requests.values() if r.seq.background]:
            if r.seq.slot >= 0 and r.seq.restore is None and r.seq.num_computed > r.seq.cached:
                self._snapshot(r, r.seq.num_computed)
            self.stats.background_preempted += 1
            self.abort(r.request_id)

    def _snapshot(self, r: Request, pos: int) -> None:
        """Save the state of r's slot, which covers its first `pos` tokens, in the prefix cache."""
        seq = r.seq
        key = PrefixKey(tuple((r.prompt_ids + r.output_ids)[:pos]), seq.key.media)
        if self.prefix.has(key, pos):
            return
        slot = self.prefix.reserve_slot()
        if slot is None:
            return
        B = self.cache.block_size
        self.snapshots.save(slot, seq.slot, self._tail_rows(seq, pos))
        boundary = pos < len(r.prompt_ids) and r.prompt_ids[pos] == self.boundary_id
        self.prefix.add(slot, key, pos, seq.blocks[:pos // B], boundary)

    def _captures(self, seq: SeqState, n: int) -> list[tuple[int, int]]:
        """(k, snapshot slot) for the snapshot points among the n prompt tokens seq runs next (not yet cached)."""
        if self.prefix is None or not seq.prefilling:
            return []
        start, out = seq.num_computed, []
        for p in seq.snap_points:
            if start < p <= start + n and not self.prefix.has(seq.key, p):
                slot = self.prefix.reserve_slot()
                if slot is None:
                    break
                out.append((p - start, slot))
        return out

    def _tail_rows(self, seq: SeqState, pos: int) -> torch.Tensor:
        """KV-cache rows of positions pos//B*B .. pos-1 of seq (the partial last block)."""
        B = self.cache.block_size
        return seq.blocks[pos // B] * B + torch.arange(pos % B, device=self.device) if pos % B else \
            torch.empty(0, dtype=torch.long, device=self.device)

    def _start(self, seq: SeqState) -> None:
        """A newly admitted sequence: zero its states, or copy in the snapshot it starts from."""
        if seq.restore is None:
            self.cache.reset(seq.slot)
            return
        self.snapshots.restore(seq.restore.slot, seq.slot, self._tail_rows(seq, seq.cached))
        seq.restore.pins -= 1
        seq.restore = None

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req.seq)

    def abort_all(self) -> list[str]:
        """Drop every request (after a failed step) and any sequence the scheduler holds without one."""
        rids = list(self.requests)
        for rid in rids:
            self.abort(rid)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq)
        return rids

    def has_work(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        work, admitted = self.scheduler.schedule()
        by_seq = {r.seq.seq_id: r for r in self.requests.values()}
        for seq in admitted:
            self._start(seq)
            r = by_seq[seq.seq_id]
            log.debug("request %s admitted: %d prompt tokens, %d from the prefix cache%s", r.request_id,
                      seq.prompt_len, seq.cached, " (background)" if seq.background else "")
        if not work:
            return []
        reqs = [by_seq[w.seq.seq_id] for w in work]
        tokens, rows, positions = [], [], []
        for w, r in zip(work, reqs):
            start = w.seq.num_computed
            tokens.extend((r.prompt_ids + r.output_ids)[start:start + w.num_new])
            positions.append(r.mm.positions_for(start, w.num_new) if r.mm is not None
                             else text_positions(start, w.num_new))
            if w.samples:
                rows.append(len(tokens) - 1)
        captures = [self._captures(w.seq, w.num_new) for w in work]
        for w, r in zip(work, reqs):        # grammar masks are computed on a thread while the forward runs
            if w.samples and r.guide is not None:
                r.guide.prefetch(self.model.cfg.vocab_size)
        batch = ForwardBatch.build([w.seq.slot for w in work], [w.seq.num_computed for w in work],
                                   [w.num_new for w in work], [w.seq.blocks for w in work],
                                   self.cache.block_size, logits=rows, positions=torch.cat(positions, dim=1),
                                   device=self.device, captures=captures)
        x = self.model.embed(torch.tensor(tokens, device=self.device))
        for w, r, offset in zip(work, reqs, batch.cu):
            if r.mm is not None:
                r.mm.scatter_into(x, w.seq.num_computed, w.num_new, offset)
        logits = self.model(x, batch, self.cache)
        outputs, k = [], 0
        for w, r, caps in zip(work, reqs, captures):
            seq = w.seq
            if seq.prefilling:
                self.stats.prompt_tokens_computed += w.num_new
            for upto, snap in caps:               # the layers wrote the states; add the KV tail, register
                pos = seq.num_computed + upto
                self.snapshots.save_tail(snap, self._tail_rows(seq, pos))
                self.prefix.add(snap, seq.key, pos, seq.blocks[:pos // self.cache.block_size],
                                pos < seq.prompt_len and r.prompt_ids[pos] == self.boundary_id)
            seq.num_computed += w.num_new
            if w.samples:
                outputs.append(self._sample(r, logits[k]))
                k += 1
            elif seq.background and not seq.prefilling:
                self.stats.background_finished += 1
                self.abort(r.request_id)
        return outputs

    def _sample(self, r: Request, logits: torch.Tensor) -> StepOutput:
        p = r.params
        guide = r.guide
        forced = guide.next_forced() if guide is not None and not r.forcing else None
        if r.forcing:
            tok = r.forcing.pop(0)
        elif forced is not None:
            tok = forced
        else:
            allowed = guide.allowed(logits.shape[-1]) if guide is not None else None
            if allowed is not None and not bool(allowed.any()):
                return self._finish(r, "stop", [], [])    # the grammar allows nothing more
            tok = r.sampler(logits, r.prompt_ids, r.output_ids, allowed)
            if r.force_ids and tok == r.force_trigger:
                r.forcing, r.force_ids = r.force_ids, []
        if guide is not None:
            guide.consume(tok)
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
                r.stop_sequence = _stop_at(r.text, p.stop, cut)
                r.text = r.text[:cut]
                return self._finish(r, "stop", [tok], logprobs, flush=False)
        if len(r.output_ids) >= p.max_tokens:
            return self._finish(r, "length", [tok], logprobs)
        hold = max((len(s) for s in p.stop), default=1) - 1            # a stop string may still be forming
        upto = max(r.released, len(r.text) - hold)
        delta, r.released = r.text[r.released:upto], upto
        return StepOutput(r.request_id, [tok], delta, logprobs=logprobs, cached_tokens=r.seq.cached)

    def _finish(self, r: Request, reason: str, toks: list[int], logprobs, flush: bool = True) -> StepOutput:
        if flush and r.decoder is not None:
            r.text += r.decoder.finish()
            cut = _find_stop(r.text, r.params.stop, r.released)
            if cut is not None:
                r.stop_sequence = _stop_at(r.text, r.params.stop, cut)
                r.text, reason = r.text[:cut], "stop"
        delta = r.text[r.released:]
        r.released, r.finish_reason = len(r.text), reason
        if self.prefix is not None and r.seq.num_computed > r.seq.prompt_len:
            self._snapshot(r, r.seq.num_computed)           # the next turn extends prompt + answer
        self.scheduler.finish(r.seq)
        del self.requests[r.request_id]
        return StepOutput(r.request_id, toks, delta, True, reason, logprobs, r.seq.cached, r.stop_sequence)


def _stop_at(text: str, stops, at: int) -> str:
    """Which stop string starts at `at` (the longest, if several do)."""
    return max((s for s in stops if text.startswith(s, at)), key=len)


def _find_stop(text: str, stops, released: int) -> int | None:
    """Earliest stop string in text that ends after `released` (earlier text was already checked)."""
    if not stops:
        return None
    lo = max(0, released - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else None
