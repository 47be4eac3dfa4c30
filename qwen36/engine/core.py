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
one chunk, takes the main model's choice at each position in order (output.py, the same sampling as without
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

import torch

from ..model import TextModel
from ..multimodal import MultimodalPrompt
from ..sampling import Sampler, SamplingParams, StopMatcher
from ..structured import GrammarBackend, Guide, json_grammar
from ..tokenizer import StreamDecoder, Tokenizer
from . import output
from .config import EngineConfig
from .prefix_cache import PrefixKey, snapshot_points
from .request import EngineStats, Request, StepOutput
from .runner import ModelRunner
from .scheduler import Scheduler, SeqState
from .speculative import Drafter, Speculator


log = logging.getLogger("qwen36.engine")
BOUNDARY_GAP, MAX_BOUNDARIES = 16, 32   # message-start snapshots per prompt: >= 16 tokens apart, the last 32
MAX_FORWARD_FAILURES = 3                # failed batched passes a request may be in before it fails


class Engine:
    """Continuous batching over a model (see the module docstring). `step` runs one step of every scheduled
    request and returns their outputs; it does not raise for a failure of one request's own work (that
    request ends with finish_reason "error") nor of a batched pass (its sequences are recomputed, each alone,
    and only one that fails again alone, or too often, ends with "error"). A caller's catch around `step`
    is a last resort (`abort_all`)."""

    def __init__(self, model: TextModel, tokenizer: Tokenizer | None, config: EngineConfig | None = None, *,
                 eos_token_ids=(), grammar: GrammarBackend | None = None, drafter: Drafter | None = None,
                 **settings):
        """config: the engine's settings (EngineConfig; settings= override single ones by their names). Sizes
        the engine leaves unset (kv_cache_memory, prefix_cache_memory) are 1 GiB here; LLM sizes them from the
        machine. drafter: replaces the MTP head's drafts (speculative.py); outputs do not change."""
        self.config = config = EngineConfig.build(config, **settings)
        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos_token_ids)
        self.device = model.embed_tokens.weight.device
        k = config.num_speculative_tokens
        if k and model.mtp is None:
            raise ValueError("speculative decoding needs the MTP head: load the model with mtp=True")
        self.runner = runner = ModelRunner(model, config, k)
        self.speculator = Speculator(model, runner.cache, k, config.draft_vocab_size,
                                     tokenizer.special_tokens.values() if tokenizer is not None else (), drafter)
        self.max_model_len = runner.max_model_len
        # a step writes KV rows up to 2k past the known tokens with k drafts (verification, then the MTP chain)
        self.scheduler = Scheduler(config.max_num_seqs, runner.num_blocks, config.block_size,
                                   max(config.max_num_batched_tokens, config.max_num_seqs), self.max_model_len,
                                   snapshot_slots=runner.num_snapshots, lookahead=1 + 2 * k)
        self.prefix = self.scheduler.prefix                    # None when prefix caching is off
        self.snapshots = runner.snapshots
        self.boundary_id = tokenizer.token_id("<|im_start|>") if tokenizer is not None else None
        self.grammar = grammar
        self.stats = EngineStats()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    @property
    def cache(self):
        return self.runner.cache

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def snapshot_bytes(self) -> int:
        return self.runner.snapshot_bytes

    @property
    def spec_k(self) -> int:
        """Tokens drafted per step now (0: no speculation)."""
        return self.speculator.k

    def speculate(self, k: int, drafter: Drafter | None = None) -> None:
        """Draft k tokens per step from now on (0 .. the configured num_speculative_tokens; 0 turns speculation
        off), the drafts replaced by `drafter` if given. The output is the same at any k."""
        if not 0 <= k <= self.speculator.max_k:
            raise ValueError(f"k={k}: the engine was configured for 0..{self.speculator.max_k} speculative tokens")
        self.speculator.k, self.speculator.drafter = k, drafter

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
            seq.snap_points = tuple(snapshot_points(prompt_ids, 0, self.boundary_id, self.config.snapshot_every,
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
            self.snapshots.save(slot, seq.slot, self.runner.tail_rows(seq, pos))
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
        self.model.backend.prepare_thread()     # per thread: the server steps the engine on its own thread
        work, admitted = self.scheduler.schedule()
        by_seq = {r.seq.seq_id: r for r in self.requests.values()}
        outputs = []
        for seq in admitted:
            r = by_seq[seq.seq_id]
            try:
                self.runner.start(seq)
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
                self.speculator.propose([(r, start, off, out) for r, start, off, out in zip(reqs, starts, batch.cu, pending)
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
        """The batched forward (ModelRunner.forward), after reserving each item's snapshot captures into
        `captures` (the caller frees them if this raises)."""
        for w in work:
            captures.append(self._captures(w.seq, w.num_new))
        return self.runner.forward(work, reqs, captures, hidden=self.spec_k > 0)

    def _register(self, w, r: Request, caps: list[tuple[int, int]], start: int, off: int, hidden) -> None:
        """Register the snapshots the forward wrote for r's prompt (the layers wrote the states; add the
        KV tail); a capture not registered is given back."""
        for j, (upto, snap) in enumerate(caps):
            try:
                pos = start + upto
                self.snapshots.save_tail(snap, self.runner.tail_rows(w.seq, pos))
                if hidden is not None:
                    self.snapshots.layers[self.speculator.layer]["hidden"][snap] = hidden[off + upto - 1]
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
        """r's tokens from the step's logits (output.advance); sets num_computed, rolling the DeltaNet states
        back past a rejected draft. Returns what `_release` needs: (tokens, logprobs, reason or None, flush)."""
        toks, logprobs, reason, flush, accepted = output.advance(r, logits, drafts)
        r.seq.num_computed += n_known + accepted
        if drafts:
            self.stats.spec_steps += 1
            self.stats.draft_tokens += len(drafts)
            self.stats.accepted_tokens += accepted
            if accepted < len(drafts):
                self.runner.rewind(r.seq.slot, accepted)
        return toks, logprobs, reason, flush

    def _release(self, r: Request, toks: list[int], logprobs: list[dict], reason: str | None,
                 flush: bool) -> StepOutput:
        if reason is not None:
            return self._finish(r, reason, toks, logprobs, flush)
        return output.release(r, toks, logprobs)

    def _finish(self, r: Request, reason: str, toks: list[int], logprobs, flush: bool = True) -> StepOutput:
        out = output.finish(r, reason, toks, logprobs, flush)
        if self.prefix is not None and r.seq.num_computed > len(r.prompt_ids):
            self._snapshot(r, r.seq.num_computed)           # the next turn extends prompt + answer
        self.scheduler.finish(r.seq)
        del self.requests[r.request_id]
        return out
