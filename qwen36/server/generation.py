"""The engine side of one API request: its sampling parameters, its engine requests submitted together, and
their outputs in arrival order (with the time-to-first-token and time-per-token metrics), aborted when the
request goes away. Protocol-free: the chat core and /v1/completions both run on it."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ..engine import StepOutput
from ..sampling import SamplingParams
from .context import ServingContext
from .protocol import APIError, ContextLengthError
from .runner import Submission, now

# SamplingParams fields a request may set directly (the rest: max_tokens, logprobs, seed per choice, the constraint)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "stop", "stop_token_ids", "logit_bias", "ignore_eos")


def max_tokens_for(ctx: ServingContext, prompt_len: int, max_tokens: int | None) -> int:
    """The context check, once for every API: the prompt must leave room for one token, and a requested
    max_tokens must fit beside it; no max_tokens: the room left."""
    room = ctx.max_model_len - prompt_len
    if room <= 0:
        raise ContextLengthError(prompt_len, ctx.max_model_len)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                       f"exceeds the maximum context length of {ctx.max_model_len} tokens", param="max_tokens")
    return max_tokens


def sampling_params(ctx: ServingContext, fields: dict, max_tokens: int, logprobs: int | None,
                    seed: int | None, constraint: dict | None = None) -> SamplingParams:
    """A request's sampling fields (SAMPLING_FIELDS, checked at the edge: logit_bias keys are token ids)
    over the checkpoint's defaults. A value SamplingParams still refuses is a 400 naming its field."""
    extra = {"seed": seed} if seed is not None else {}
    try:
        return ctx.sampling_params(**fields, **extra, max_tokens=max_tokens, logprobs=logprobs, **(constraint or {}))
    except ValueError as e:
        raise APIError(str(e), param=getattr(e, "field", None)) from None


def logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as JSON object keys) -> a bias in [-100, 100]; checked here, once."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise APIError(f"logit_bias: {key!r} is not a token id (0..{vocab - 1})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(f"logit_bias[{key!r}] = {value} is outside [-100, 100]", param="logit_bias")
        out[int(key)] = value
    return out


class Generation:
    """The engine requests of one API request (n per prompt): submitted all or none, their outputs as they
    arrive, every unfinished one aborted when the consumer stops (the client left)."""

    def __init__(self, ctx: ServingContext):
        self.runner = ctx.runner
        self.rids: list[str] = []
        self.queue: asyncio.Queue | None = None

    @property
    def started(self) -> bool:
        return bool(self.rids)

    async def submit(self, subs: list[Submission]) -> None:
        self.t0 = now()
        self.queue = asyncio.Queue()
        try:
            self.rids = await self.runner.submit(subs, self.queue)
        except ValueError as e:                # the engine's own refusal (e.g. the KV cache cannot hold it)
            raise APIError(str(e), param="max_tokens") from None

    def abort(self) -> None:
        for rid in self.rids:
            self.runner.abort(rid)

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(engine request index, output) as they arrive, until every one finished. A client that leaves
        cancels the task this runs in (the server watches for the disconnect, streaming or not): every
        unfinished request is aborted then."""
        index = {rid: i for i, rid in enumerate(self.rids)}
        pending = set(self.rids)
        first: dict[int, float] = {}
        generated: dict[int, int] = {}
        metrics = self.runner.metrics
        try:
            while pending:
                out = await self.queue.get()
                i = index[out.request_id]
                generated[i] = generated.get(i, 0) + len(out.token_ids)
                if i not in first and out.token_ids:
                    first[i] = now()
                    metrics.ttft.observe(first[i] - self.t0)
                if out.finished:
                    pending.discard(out.request_id)
                    self.runner.finished(out.request_id)
                    if i in first and generated[i] > 1:
                        metrics.tpot.observe((now() - first[i]) / (generated[i] - 1))
                yield i, out
        finally:
            for rid in pending:
                self.runner.abort(rid)                 # frees slots of anything unfinished at once
