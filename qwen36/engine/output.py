"""Output processing for one request: from a step's logits to tokens, text and the finish reason.

Per position: the token decoding emits (`pick`: forced tokens, else a sample under the grammar's mask), its
logprobs if asked, then the end conditions in order: a stop token (not emitted), a stop string found in the
detokenized text (the text is cut where it starts), max_tokens. Text that could be the start of a stop string
is held back (`release`) until it cannot be. These functions touch only the request; the engine core owns
the slots, the caches and the counters.
"""
from __future__ import annotations

import torch

from .request import Request, StepOutput


def advance(r: Request, logits: torch.Tensor, drafts: list[int]) -> tuple[list[int], list[dict], str | None,
                                                                           bool, int]:
    """Choose r's next tokens from logits [1 + len(drafts), V]: position j's choice is made as decoding would
    make it, and the next position counts only while the choice equals draft j. Appends the tokens to r and
    returns (tokens, logprobs, finish reason or None, flush the decoder at the finish, drafts accepted)."""
    p = r.params
    toks, logprobs, reason, flush, accepted = [], [], None, True, 0
    for j in range(logits.shape[0]):
        draft = drafts[j] if j < len(drafts) else None
        tok = pick(r, logits[j], draft)
        if tok is None:                                  # the grammar allows nothing more
            reason = "stop"
            break
        if p.logprobs is not None:
            logprobs.append(token_logprobs(logits[j], tok, p.logprobs))
        if tok in r.stop_ids:
            reason = "stop"
            break
        r.output_ids.append(tok)
        r.seq.num_tokens += 1
        toks.append(tok)
        if r.decoder is not None:
            r.text += r.decoder.feed(tok)
            if stopped(r):
                reason, flush = "stop", False
                break
        if len(r.output_ids) >= p.max_tokens:
            reason = "length"
            break
        if tok != draft:
            break
        accepted += 1                                    # draft j is now part of the sequence, and computed
    return toks, logprobs, reason, flush, accepted


def pick(r: Request, logits: torch.Tensor, draft: int | None) -> int | None:
    """The token decoding emits at this position (forced, or sampled under the grammar's mask); None when the
    grammar allows nothing. The guide consumes it."""
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


def token_logprobs(logits: torch.Tensor, tok: int, top_n: int) -> dict:
    """{"token_id", "logprob", "top": [(id, logprob)] of the top_n} for the chosen token."""
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, top_n) if top_n else None
    return {"token_id": tok, "logprob": float(lp[tok]),
            "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []}


def stopped(r: Request) -> bool:
    """Whether r's text (just appended to) now holds a stop string: if so it is cut where the earliest one
    starts (the longest of those starting there is the stop_sequence)."""
    if r.stops is None:
        return False
    hit, r.checked = r.stops.search(r.text, r.checked), len(r.text)
    if hit is None:
        return False
    cut, r.stop_sequence = hit
    r.text = r.text[:cut]
    return True


def release(r: Request, toks: list[int], logprobs: list[dict]) -> StepOutput:
    """The output of a step that did not finish r: the tokens, and the text no stop string can still claim."""
    hold = r.stops.hold if r.stops is not None else 0                # a stop string may still be forming
    upto = max(r.released, len(r.text) - hold)
    delta, r.released = r.text[r.released:upto], upto
    return StepOutput(r.request_id, toks, delta, logprobs=logprobs, cached_tokens=r.seq.cached)


def finish(r: Request, reason: str, toks: list[int], logprobs: list[dict], flush: bool = True) -> StepOutput:
    """The last output of r: the decoder flushed (which may still complete a stop string) and all held text."""
    if flush and r.decoder is not None:
        r.text += r.decoder.finish()
        if stopped(r):
            reason = "stop"
    delta = r.text[r.released:]
    r.released, r.finish_reason = len(r.text), reason
    return StepOutput(r.request_id, toks, delta, True, reason, logprobs, r.seq.cached, r.stop_sequence)
