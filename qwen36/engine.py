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

Speculative decoding (num_speculative_tokens = k > 0, the checkpoint's MTP head; mtp.py): after each step
the head drafts up to k tokens per decoding sequence; the next step runs the last token and the drafts as
one chunk, takes the main model's choice at each position in order (`_pick`, the same sampling as without
drafts: a greedy choice, or rejection sampling that keeps p exact) and stops at the first disagreement.
The DeltaNet states after each draft are kept (ForwardBatch.keep), so a rejection resumes from the last
accepted token's state; KV rows past it are simply overwritten later. Nothing of a rejected draft stays in
any cache: num_computed never counts it, and prefix-cache snapshots are taken only up to num_computed.

Failures: `step` fails only the requests it must, and does not raise for them. An exception in one request's
own work (starting its slot, sampling, penalties, grammar, detokenizing, stop strings, logprobs, prefix-cache
snapshots, finishing) ends that request alone with finish_reason "error" and frees its slot and blocks. An
exception in a batched pass (the model's forward, or the MTP head's), which may have written part of the
state of every sequence in it, sends the batch's sequences back to the queue through the scheduler's
preemption: they are recomputed from prompt + output when readmitted (exact, as any preemption), each in a
forward of its own until it is past the point that failed. One that fails again alone, or in
MAX_FORWARD_FAILURES failed passes in all, ends with "error"; the others go on with the tokens they would
have had. The server's catch around `step` is a last resort.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from . import hugepages
from .batch import ForwardBatch, text_positions
from .cache import HybridCache, SnapshotStore
from .cuda_graphs import DecodeGraphs
from .kernels import flush_denormals
from .model import TextModel
from .mtp import DraftHead
from .multimodal import MultimodalPrompt
from .sampling import Sampler, SamplingParams, StopMatcher
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
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" (a failure of its own, see Engine)
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
    stops: StopMatcher | None = None   # the stop strings, indexed once
    checked: int = 0                   # len of text already searched for stop strings
    stop_ids: frozenset[int] = frozenset()   # tokens that end the output (stop_token_ids, and eos unless ignored)
    failures: int = 0                  # failed batched passes this request was in
    isolate_until: int = 0             # run in a forward of its own until num_computed reaches this (a retry)


@dataclass
class EngineStats:
    prompt_tokens_computed: int = 0     # prompt tokens run through the model (not taken from the cache)
    background_started: int = 0
    background_finished: int = 0
    background_preempted: int = 0
    spec_steps: int = 0                 # verification chunks run (a decode step with drafts)
    draft_tokens: int = 0               # drafted tokens verified
    accepted_tokens: int = 0            # of those, accepted
    failed_passes: int = 0              # batched passes (forward, MTP head) that raised
    failed_requests: int = 0            # requests ended with finish_reason "error"


log = logging.getLogger("qwen36.engine")
BOUNDARY_GAP, MAX_BOUNDARIES = 16, 32   # message-start snapshots per prompt: >= 16 tokens apart, the last 32
MAX_FORWARD_FAILURES = 3                # failed batched passes a request may be in before it fails


class Engine:
    """Continuous batching over a model (see the module docstring). `step` runs one step of every scheduled
    request and returns their outputs; it does not raise for a failure of one request's own work (that
    request ends with finish_reason "error") nor of a batched pass (its sequences are recomputed, each alone,
    and only one that fails again alone, or too often, ends with "error"). A caller's catch around `step`
    is a last resort (`abort_all`)."""

    def __init__(self, model: TextModel, tokenizer: Tokenizer | None, eos_token_ids=(), num_slots: int = 8,
                 max_model_len: int | None = None, kv_cache_bytes: int = 1 << 30, block_size: int = 64,
                 token_budget: int = 512, enable_prefix_caching: bool = True, prefix_cache_bytes: int = 1 << 30,
                 snapshot_every: int = 4096, grammar: GrammarBackend | None = None,
                 num_speculative_tokens: int = 0, draft_vocab_size: int | None = None, cuda_graphs: bool = False):
        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos_token_ids)
        self.device = model.embed_tokens.weight.device
        cfg = model.cfg
        if num_speculative_tokens and model.mtp is None:
            raise ValueError("speculative decoding needs the MTP head: load the model with mtp=True")
        self.spec_k = num_speculative_tokens
        self.mtp_layer = len(model.layers)                   # the MTP head's index in the cache
        self.draft_head = DraftHead(model.lm_head, cfg.vocab_size, draft_vocab_size,
                                    tokenizer.special_tokens.values() if tokenizer is not None else ()) \
            if self.spec_k else None
        # bench only: (request, drafts) -> drafts to verify instead (oracle acceptance; qwen36 bench)
        self.draft_override = None
        layout = model.cache_layout(mtp=self.spec_k > 0)
        per_block = HybridCache(layout, 0, 1, block_size, model.compute_dtype, "meta").bytes_per_block()
        # no max_model_len: what the KV budget holds, up to the model's native context
        capacity = max(1, kv_cache_bytes // max(per_block, 1)) * block_size
        max_model_len = min(max_model_len or capacity, cfg.max_position_embeddings)
        num_blocks = max(1, min(kv_cache_bytes // max(per_block, 1), num_slots * -(-max_model_len // block_size)))
        # cuda_graphs: plain decode steps replay CUDA graphs (cuda_graphs.py), whose padding rows use one slot and
        # one block past the scheduler's (no graphs with speculation: its steps verify drafts)
        graphs = cuda_graphs and not num_speculative_tokens
        self.cache = HybridCache(layout, num_slots + graphs, num_blocks + graphs, block_size, model.compute_dtype,
                                 self.device)
        self.graphs = DecodeGraphs(model, self.cache, num_slots, num_blocks, capture=self.device.type == "cuda") \
            if graphs else None
        if self.spec_k:     # per slot: the DeltaNet states after each draft (empty: pages touched when used)
            for tensors in self.cache.layers.values():
                for name in ("conv", "state"):
                    if name in tensors:
                        t = tensors[name]
                        tensors["spec_" + name] = hugepages.zeros((num_slots, self.spec_k, *t.shape[1:]),
                                                                  t.dtype, t.device)
        self.snapshot_bytes = SnapshotStore.bytes_per_slot(self.cache)
        num_snapshots = prefix_cache_bytes // self.snapshot_bytes if enable_prefix_caching else 0
        self.snapshots = SnapshotStore(self.cache, num_snapshots) if num_snapshots else None
        # a step writes KV rows up to 2k past the known tokens with k drafts (verification, then the MTP chain)
        self.scheduler = Scheduler(num_slots, num_blocks, block_size, max(token_budget, num_slots), max_model_len,
                                   snapshot_slots=num_snapshots, lookahead=1 + 2 * self.spec_k)
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
                    force: tuple[int | None, list[int]] | None = None, mm: MultimodalPrompt | None = None,
                    cache_salt: str = "") -> str:
        """force = (trigger token or None, token ids): emit these tokens right after the trigger is sampled
        (or first of all when the trigger is None) instead of sampling them. mm: the prompt's images/videos.
        cache_salt: prefix-cache entries are shared only between requests with the same salt."""
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
        stops = StopMatcher(params.stop) if params.stop else None
        guide = self._guide(prompt_ids, params)
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        seq = self._seq(n, prompt_ids, params.max_tokens, mm, salt=cache_salt)
        self.scheduler.add(seq)                       # raises ValueError naming the lengths if it can never fit
        self._preempt_background()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos))
        req = Request(rid, list(prompt_ids), params, seq, sampler, decoder, mm=mm, guide=guide, stops=stops,
                      stop_ids=stop_ids)
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
             background: bool = False, salt: str = "") -> SeqState:
        seq = SeqState(seq_id=n, prompt_len=len(prompt_ids), max_tokens=max_tokens, background=background)
        if self.prefix is not None:
            seq.key = PrefixKey(tuple(prompt_ids), mm.spans if mm is not None else (), salt)
            seq.snap_points = tuple(snapshot_points(prompt_ids, 0, self.boundary_id, self.snapshot_every,
                                                    min_gap=BOUNDARY_GAP, max_boundaries=MAX_BOUNDARIES))
        return seq

    def warm(self, prompt_ids: list[int], cache_salt: str = "") -> str | None:
        """Prefill prompt_ids in the background (no output) so that a later request starting with them hits
        the prefix cache. Replaces any earlier background prefill; None if there is nothing to do."""
        if self.prefix is None or not prompt_ids:
            return None
        for rid in [r.request_id for r in self.requests.values() if r.seq.background]:
            self.abort(rid)
        key = PrefixKey(tuple(prompt_ids), salt=cache_salt)
        if len(prompt_ids) + 1 > self.max_model_len or self.prefix.has(key, len(prompt_ids)):
            return None
        n = next(self._ids)
        seq = self._seq(n, prompt_ids, 0, None, background=True, salt=cache_salt)
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
        key = PrefixKey(tuple((r.prompt_ids + r.output_ids)[:pos]), seq.key.media, seq.key.salt)
        if self.prefix.has(key, pos):
            return
        slot = self.prefix.reserve_slot()
        if slot is None:
            return
        B = self.cache.block_size
        try:
            self.snapshots.save(slot, seq.slot, self._tail_rows(seq, pos))
        except BaseException:
            self.prefix.release_slot(slot)
            raise
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
        """Run one step of every scheduled request; their outputs. Does not raise for a failure of a
        request's own work or of a batched pass (see the module docstring): those end in StepOutputs with
        finish_reason "error", for the requests that must fail, while the others go on."""
        if self.device.type == "cpu":
            flush_denormals()               # per thread: the server steps the engine on its own thread
        work, admitted = self.scheduler.schedule()
        by_seq = {r.seq.seq_id: r for r in self.requests.values()}
        outputs = []
        for seq in admitted:
            r = by_seq[seq.seq_id]
            try:
                self._start(seq)
            except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
                outputs += self._fail(r, e)
                continue
            log.debug("request %s admitted: %d prompt tokens, %d from the prefix cache%s", r.request_id,
                      seq.prompt_len, seq.cached, " (background)" if seq.background else "")
        work = [w for w in work if by_seq[w.seq.seq_id].request_id in self.requests]
        # a sequence retried after a failed pass runs alone until it is past the point that failed
        alone = [w for w in work if w.seq.num_computed < by_seq[w.seq.seq_id].isolate_until]
        together = [w for w in work if w not in alone]
        for group in ([together] if together else []) + [[w] for w in alone]:
            outputs += self._run(group, [by_seq[w.seq.seq_id] for w in group], isolated=group[0] in alone)
        return outputs

    def _run(self, work: list, reqs: list[Request], isolated: bool) -> list[StepOutput]:
        """One batched forward over `work` (scheduled items of reqs), then each request's own work."""
        captures: list[list[tuple[int, int]]] = []
        try:
            logits, hidden, batch, drafts, starts = self._forward(work, reqs, captures)
        except Exception as e:  # noqa: BLE001 - the batch's states may be partly written: recompute them
            self._drop_captures(captures)
            return self._pass_failed(work, reqs, isolated, e, "forward")
        pending, k = [], 0
        for w, r, d in zip(work, reqs, drafts):
            seq = w.seq
            if seq.prefilling:
                self.stats.prompt_tokens_computed += w.num_new
            rows = 1 + len(d) if w.samples else 0
            try:
                if w.samples:
                    pending.append(self._advance(r, logits[k:k + rows], d, w.num_new - len(d)))
                else:
                    seq.num_computed += w.num_new
                    pending.append(None)
            except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
                pending.append(e)
            k += rows
        mtp_error = None
        if self.spec_k:                     # the MTP head's rows for what was computed, then the next drafts
            try:
                self._propose([(r, start, off, out) for r, start, off, out in zip(reqs, starts, batch.cu, pending)
                               if not isinstance(out, Exception)], hidden)
            except Exception as e:  # noqa: BLE001 - the MTP rows of the batch may be partly written
                mtp_error = e
        for i, (w, r, caps, start, off) in enumerate(zip(work, reqs, captures, starts, batch.cu)):
            if mtp_error is not None or isinstance(pending[i], Exception):
                self._drop_captures([caps])
                continue
            try:
                self._register(w, r, caps, start, off, hidden)
            except Exception as e:  # noqa: BLE001
                pending[i] = e
        outputs = []
        for w, r, out in zip(work, reqs, pending):
            if isinstance(out, Exception):
                outputs += self._fail(r, out)
                continue
            try:
                if out is not None:
                    outputs.append(self._release(r, *out))
                elif w.seq.background and not w.seq.prefilling:
                    self.stats.background_finished += 1
                    self.abort(r.request_id)
            except Exception as e:  # noqa: BLE001
                outputs += self._fail(r, e)
        if mtp_error is not None:            # the tokens chosen stay; the MTP head's state is recomputed
            left = [(w, r) for w, r in zip(work, reqs) if r.request_id in self.requests]
            outputs += self._pass_failed([w for w, _ in left], [r for _, r in left], isolated, mtp_error, "MTP head")
        return outputs

    def _forward(self, work: list, reqs: list[Request], captures: list):
        """The batched forward of the scheduled items: (logits of the sampled rows, hidden states or None,
        the batch, each item's drafts, each item's start). Appends each item's snapshot captures to
        `captures` as it reserves them (the caller frees them if this raises)."""
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
        for w in work:
            captures.append(self._captures(w.seq, w.num_new))
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
        if self.spec_k:
            logits, hidden = self.model(x, batch, self.cache, hidden=True)
        elif self.graphs is not None and self.graphs.applies(batch):
            logits, hidden = self.graphs(x, batch), None
        else:
            logits, hidden = self.model(x, batch, self.cache), None
        return logits, hidden, batch, drafts, starts

    def _register(self, w, r: Request, caps: list[tuple[int, int]], start: int, off: int, hidden) -> None:
        """Register the snapshots the forward wrote for r's prompt (the layers wrote the states; add the
        KV tail); a capture not registered is given back."""
        for j, (upto, snap) in enumerate(caps):
            try:
                pos = start + upto
                self.snapshots.save_tail(snap, self._tail_rows(w.seq, pos))
                if hidden is not None:
                    self.snapshots.layers[self.mtp_layer]["hidden"][snap] = hidden[off + upto - 1]
                self.prefix.add(snap, w.seq.key, pos, w.seq.blocks[:pos // self.cache.block_size],
                                pos < len(r.prompt_ids) and r.prompt_ids[pos] == self.boundary_id)
            except BaseException:
                self._drop_captures([caps[j:]])
                raise

    def _drop_captures(self, captures) -> None:
        """Give back snapshot slots reserved for captures that will not be registered."""
        for caps in captures:
            for _, snap in caps:
                self.prefix.release_slot(snap)

    def _pass_failed(self, work: list, reqs: list[Request], isolated: bool, error: Exception,
                     what: str) -> list[StepOutput]:
        """A batched pass over work raised: its sequences go back to the queue, to be recomputed from prompt +
        output, each alone until past this point; one that was alone already (or failed too often) fails."""
        self.stats.failed_passes += 1
        log.error("the %s pass of %d sequence(s) failed%s: %s: %s", what, len(work),
                  " (retried alone)" if isolated else "", type(error).__name__, error, exc_info=error)
        outputs = []
        order = {id(s): i for i, s in enumerate(self.scheduler.running)}
        # newest first: each goes to the head of the queue, so the oldest ends up first (as preemption does)
        for w, r in sorted(zip(work, reqs), key=lambda wr: -order.get(id(wr[0].seq), -1)):
            seq = w.seq
            if seq.background:
                self.abort(r.request_id)
                continue
            r.failures += 1
            if isolated or r.failures >= MAX_FORWARD_FAILURES:
                outputs += self._fail(r, error, log_it=False)
                continue
            upto = seq.num_computed if what == "MTP head" else seq.num_computed + w.num_new
            r.isolate_until = max(r.isolate_until, min(upto, seq.num_tokens))
            self.scheduler.preempt(seq)
        return outputs

    def _fail(self, r: Request, error: Exception, log_it: bool = True) -> list[StepOutput]:
        """End r alone after a failure of its own: its slot and blocks are freed, no snapshot is kept.
        A background prefill just stops (it has no one to tell)."""
        if log_it:
            log.error("request %s failed: %s: %s", r.request_id, type(error).__name__, error, exc_info=error)
        self.abort(r.request_id)
        if r.seq.background:
            return []
        self.stats.failed_requests += 1
        r.finish_reason = "error"
        return [StepOutput(r.request_id, [], "", True, "error", cached_tokens=r.seq.cached)]

    def _advance(self, r: Request, logits: torch.Tensor, drafts: list[int], n_known: int):
        """Choose r's next tokens from the step's logits [1 + len(drafts), V]: position j's choice is made as
        decoding would make it, and the next position counts only while the choice equals draft j. Appends
        the tokens, sets num_computed (rewinding the DeltaNet states past a rejected draft) and returns what
        `_release` needs: (tokens, logprobs, finish reason or None, flush)."""
        seq, p = r.seq, r.params
        toks, logprobs, reason, flush, accepted = [], [], None, True, 0
        for j in range(logits.shape[0]):
            draft = drafts[j] if j < len(drafts) else None
            tok = self._pick(r, logits[j], draft)
            if tok is None:                                  # the grammar allows nothing more
                reason = "stop"
                break
            if p.logprobs is not None:
                lp = torch.log_softmax(logits[j].float(), -1)
                top = torch.topk(lp, p.logprobs) if p.logprobs else None
                logprobs.append({"token_id": tok, "logprob": float(lp[tok]),
                                 "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []})
            if tok in r.stop_ids:
                reason = "stop"
                break
            r.output_ids.append(tok)
            seq.num_tokens += 1
            toks.append(tok)
            if r.decoder is not None:
                r.text += r.decoder.feed(tok)
                if self._stopped(r):
                    reason, flush = "stop", False
                    break
            if len(r.output_ids) >= p.max_tokens:
                reason = "length"
                break
            if tok != draft:
                break
            accepted += 1                                    # draft j is now part of the sequence, and computed
        seq.num_computed += n_known + accepted
        if drafts:
            self.stats.spec_steps += 1
            self.stats.draft_tokens += len(drafts)
            self.stats.accepted_tokens += accepted
            if accepted < len(drafts):
                self._rewind(seq.slot, accepted)
        return toks, logprobs, reason, flush

    def _pick(self, r: Request, logits: torch.Tensor, draft: int | None) -> int | None:
        """The token decoding emits at this position (forced, or sampled under the grammar's mask); None
        when the grammar allows nothing. The guide consumes it."""
        guide = r.guide
        forced = guide.next_forced() if guide is not None and not r.forcing else None
        if r.forcing:
            tok = r.forcing.pop(0)
        elif forced is not None:
            tok = forced
        else:
            allowed = guide.allowed(logits.shape[-1]) if guide is not None else None
            if allowed is not None and not bool(allowed.any()):
                return None
            tok = r.sampler(logits, r.prompt_ids, r.output_ids, allowed, draft)
            if r.force_ids and tok == r.force_trigger:
                r.forcing, r.force_ids = r.force_ids, []
        if guide is not None:
            guide.consume(tok)
        return tok

    @staticmethod
    def _stopped(r: Request) -> bool:
        """Whether r's text (just appended to) now holds a stop string: if so it is cut where the earliest
        one starts (the longest of those starting there is the stop_sequence)."""
        if r.stops is None:
            return False
        hit, r.checked = r.stops.search(r.text, r.checked), len(r.text)
        if hit is None:
            return False
        cut, r.stop_sequence = hit
        r.text = r.text[:cut]
        return True

    def _rewind(self, slot: int, j: int) -> None:
        """The slot's DeltaNet states back to those after token j of the last verification chunk."""
        for tensors in self.cache.layers.values():
            if "spec_state" in tensors:
                tensors["state"][slot] = tensors["spec_state"][slot, j]
                tensors["conv"][slot] = tensors["spec_conv"][slot, j]

    def _release(self, r: Request, toks: list[int], logprobs: list[dict], reason: str | None,
                 flush: bool) -> StepOutput:
        if reason is not None:
            return self._finish(r, reason, toks, logprobs, flush)
        hold = r.stops.hold if r.stops is not None else 0                # a stop string may still be forming
        upto = max(r.released, len(r.text) - hold)
        delta, r.released = r.text[r.released:upto], upto
        return StepOutput(r.request_id, toks, delta, logprobs=logprobs, cached_tokens=r.seq.cached)

    def _propose(self, items, hidden: torch.Tensor) -> None:
        """The MTP head (mtp.py) over this step's work: write its KV rows for every newly computed position
        whose next token is known, keep each slot's last hidden state, and draft the next tokens of every
        sequence that goes on decoding. items: (request, start, offset of its tokens in the step, the
        _advance result or None)."""
        L, B = self.mtp_layer, self.cache.block_size
        slot_hidden = self.cache[L]["hidden"]
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
                if out is not None and out[2] is None and not seq.prefilling and self._budget(r) > 0:
                    drafting.append((r, len(lens) - 1))
                    logit_rows.append(sum(lens) - 1)
            slot_hidden[seq.slot] = hidden[off + seq.num_computed - 1 - start]
            seq.mtp_rows = max(hi, lo)
        if not lens:
            return
        batch = ForwardBatch.build(slots, lows, lens, tables, B, positions=torch.cat(pos, dim=1),
                                   device=self.device, first_row=1)
        x = self.model.embed(torch.tensor(ids, device=self.device))
        for r, lo, n, offset in zip(members, lows, lens, batch.cu):
            if r.mm is not None:             # image and video rows take their embeddings, as in the forward
                r.mm.scatter_into(x, lo, n, offset)
        g = self.model.draft(x, torch.cat(hs), batch, self.cache)
        ends = [c - 1 for c in batch.cu[1:]]
        firsts = self.draft_head(g[logit_rows]) if logit_rows else []
        chains = [[r, [d], g[ends[i]]] for d, (r, i) in zip(firsts, drafting)]
        for step in range(1, self.spec_k):           # each further draft: one row per sequence still drafting
            live = [c for c in chains if len(c[1]) < self._budget(c[0])]
            if not live:
                break
            rows = [r.seq.num_tokens - 1 + step for r, _, _ in live]
            ps = [r.mm.positions_for(row - 1, 1) if r.mm is not None else text_positions(row - 1, 1)
                  for (r, _, _), row in zip(live, rows)]
            batch = ForwardBatch.build([r.seq.slot for r, _, _ in live], rows, [1] * len(live),
                                       [r.seq.blocks for r, _, _ in live], B,
                                       positions=torch.cat(ps, dim=1), device=self.device, first_row=1)
            x = self.model.embed(torch.tensor([d[-1] for _, d, _ in live], device=self.device))
            g = self.model.draft(x, torch.stack([h for _, _, h in live]), batch, self.cache)
            for j, (c, d) in enumerate(zip(live, self.draft_head(g))):
                c[1].append(d)
                c[2] = g[j]
        for r, d, _ in chains:
            if r.forcing:                            # tokens that will be forced are the best drafts
                d = (r.forcing + d)[:len(d)]
            if self.draft_override is not None:
                d = list(self.draft_override(r, d))[:self._budget(r)]
            r.seq.drafts = d

    def _budget(self, r: Request) -> int:
        """How many tokens r may draft now: k, but no more than its remaining max_tokens allows after the
        token verification always adds (the KV blocks reserved for it hold exactly that)."""
        return min(self.spec_k, r.params.max_tokens - len(r.output_ids) - 1)

    def _finish(self, r: Request, reason: str, toks: list[int], logprobs, flush: bool = True) -> StepOutput:
        if flush and r.decoder is not None:
            r.text += r.decoder.finish()
            if self._stopped(r):
                reason = "stop"
        delta = r.text[r.released:]
        r.released, r.finish_reason = len(r.text), reason
        if self.prefix is not None and r.seq.num_computed > len(r.prompt_ids):
            self._snapshot(r, r.seq.num_computed)           # the next turn extends prompt + answer
        self.scheduler.finish(r.seq)
        del self.requests[r.request_id]
        return StepOutput(r.request_id, toks, delta, True, reason, logprobs, r.seq.cached, r.stop_sequence)
