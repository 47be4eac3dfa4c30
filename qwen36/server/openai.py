"""OpenAI's chat completions and completions on the chat core: `POST /v1/chat/completions`, `/v1/completions`.

A `ChatCompletionRequest` becomes a `ChatCall` (`to_call`: the request's checks are done once, here or as it
validated); its turn's events and answers are written back as OpenAI's response object or SSE chunks.
`/v1/completions` (plain prompts, no template) runs on the same engine plumbing (`generation.py`).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from ..engine import StepOutput
from .chat import (Answer, ChatCall, ChatTurn, Done, Logprobs, ReasoningDelta, TextDelta, TokenLogprob,
                   ToolCallDelta, Usage, tool_call_dict, total_usage)
from .context import ServingContext
from .generation import SAMPLING_FIELDS, Generation, logit_bias, max_tokens_for, sampling_params
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, NamedToolChoice
from .runner import Submission


def to_call(req: ChatCompletionRequest, vocab_size: int) -> ChatCall:
    """A chat completions request as the chat core's call."""
    sampling = {k: getattr(req, k) for k in SAMPLING_FIELDS if k != "logit_bias" and getattr(req, k) is not None}
    if req.logit_bias:
        sampling["logit_bias"] = logit_bias(req.logit_bias, vocab_size)
    on, effort_budget = req.thinking_effort
    choice = req.tool_choice
    named = isinstance(choice, NamedToolChoice)
    return ChatCall(
        messages=[m.model_dump(exclude_none=True) for m in req.messages],
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice="function" if named else (choice or "auto"),
        tool_name=choice.function.get("name") if named else None,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_schema=req.answer_schema,
        template_kwargs=dict(req.chat_template_kwargs or {}),
        enable_thinking=on, thinking_budget=req.thinking_token_budget, effort_budget=effort_budget,
        sampling=sampling, seed=req.seed, max_tokens=req.max_completion_tokens or req.max_tokens, n=req.n,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, cache_salt=req.cache_salt or "")


def usage_body(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def logprob_entries(lps: tuple[TokenLogprob, ...]) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
            for lp in lps]


def delta_body(e: ReasoningDelta | TextDelta | ToolCallDelta) -> dict:
    if isinstance(e, ReasoningDelta):
        return {"reasoning_content": e.text}
    if isinstance(e, TextDelta):
        return {"content": e.text}
    return {"tool_calls": [tool_call_dict(e)]}


class _Response:
    """An OpenAI response's id, timestamp and SSE chunks."""
    prefix = object_name = ""

    def __init__(self, req, ctx: ServingContext):
        self.req, self.ctx = req, ctx
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": self.object_name, "created": self.created,
                "model": self.ctx.config.served_model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def body(self, choices: list[dict], usage: Usage) -> dict:
        return {"id": self.id, "object": self.object_name.removesuffix(".chunk"), "created": self.created,
                "model": self.ctx.config.served_model_name, "choices": choices, "usage": usage_body(usage)}


class ChatCompletionJob(_Response):
    """One /v1/chat/completions request."""
    prefix, object_name = "chatcmpl", "chat.completion.chunk"

    def __init__(self, req: ChatCompletionRequest, ctx: ServingContext):
        super().__init__(req, ctx)
        self.turn = ChatTurn(to_call(req, ctx.vocab_size), ctx)

    @property
    def started(self) -> bool:
        return self.turn.started

    async def prepare(self) -> None:
        await self.turn.prepare()

    async def complete(self, request: Request) -> dict:
        answers: list[Answer] = await self.turn.answers()
        choices = []
        for i, a in enumerate(answers):
            message = {"role": "assistant", "content": a.result.content, "reasoning_content": a.result.reasoning_content}
            if a.result.tool_calls:
                message["tool_calls"] = a.result.tool_calls
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": logprob_entries(a.done.logprobs)} if self.req.logprobs else None,
                            "finish_reason": a.done.finish_reason})
        return self.body(choices, total_usage([a.done.usage for a in answers]))

    async def stream(self, request: Request) -> AsyncIterator[str]:
        for i in range(self.turn.call.n):
            yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
        usages: list[Usage] = []
        async for e in self.turn.events():
            if isinstance(e, Done):
                usages.append(e.usage)
                yield self.chunk([{"index": e.choice, "delta": {}, "logprobs": None, "finish_reason": e.finish_reason}])
                continue
            lp = {"content": logprob_entries(e.logprobs)} if self.req.logprobs and e.logprobs else None
            delta = {} if isinstance(e, Logprobs) else delta_body(e)
            yield self.chunk([{"index": e.choice, "delta": delta, "logprobs": lp, "finish_reason": None}])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield self.chunk([], usage_body(total_usage(usages)))
        yield "data: [DONE]\n\n"


class CompletionJob(_Response):
    """One /v1/completions request: prompts (text or token ids) x n, no chat template."""
    prefix, object_name = "cmpl", "text_completion"

    def __init__(self, req: CompletionRequest, ctx: ServingContext):
        super().__init__(req, ctx)
        self.generation = Generation(ctx)
        sampling = {k: getattr(req, k) for k in SAMPLING_FIELDS if k != "logit_bias" and getattr(req, k) is not None}
        if req.logit_bias:
            sampling["logit_bias"] = logit_bias(req.logit_bias, ctx.vocab_size)
        self.sampling = sampling

    @property
    def started(self) -> bool:
        return self.generation.started

    async def prepare(self) -> None:
        req, ctx = self.req, self.ctx
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
        if not prompts:
            raise APIError("prompt is empty", param="prompt")

        def tokenize():                                        # off the event loop: it scales with the request
            ids = []
            for x in prompts:
                t = ctx.tokenizer.encode(x) if isinstance(x, str) else list(x)
                if not t:
                    raise APIError("prompt has no tokens", param="prompt")
                bad = [v for v in t if not 0 <= v < ctx.vocab_size]       # the token-id check, once
                if bad:
                    raise APIError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
                ids.append(t)
            return ids
        self.prompts = await asyncio.to_thread(tokenize)
        self.prompt_of = [i for i in range(len(self.prompts)) for _ in range(req.n)]   # per choice: its prompt
        subs = []
        for p in self.prompts:                                 # everything checked before anything is queued
            max_tokens = max_tokens_for(ctx, len(p), req.max_tokens or 16)
            for c in range(req.n):
                params = sampling_params(ctx, self.sampling, max_tokens, req.logprobs,
                                         None if req.seed is None else req.seed + c)
                subs.append(Submission(p, params, cache_salt=req.cache_salt or ""))
        await self.generation.submit(subs)

    def _logprobs(self, out: StepOutput) -> dict:
        decode = self.ctx.tokenizer.decode
        entries = [(decode([lp["token_id"]]), lp["logprob"], [(decode([t]), v) for t, v in lp["top"]])
                   for lp in out.logprobs]
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [v for _, v, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": []}

    def _usage(self, generated: list[int], cached: list[int]) -> Usage:
        return total_usage([Usage(len(self.prompts[p]), g, c) for p, g, c in zip(self.prompt_of, generated, cached)],
                           self.prompt_of)

    async def complete(self, request: Request) -> dict:
        n = len(self.prompt_of)
        texts, reasons, lps = [""] * n, ["stop"] * n, [None] * n
        generated, cached = [0] * n, [0] * n
        async for i, out in self.generation.outputs():
            texts[i] += out.text
            generated[i] += len(out.token_ids)
            cached[i] = out.cached_tokens
            if self.req.logprobs is not None:
                lp = self._logprobs(out)
                lps[i] = lp if lps[i] is None else {k: lps[i][k] + lp[k] for k in lp}
            if out.finished:
                reasons[i] = out.finish_reason
        if "error" in reasons:
            raise APIError("the engine failed while generating; the request was dropped", 500, type_="server_error")
        choices = []
        for i, text in enumerate(texts):
            if self.req.echo:
                text = self.ctx.tokenizer.decode(self.prompts[self.prompt_of[i]]) + text
            lp = None
            if self.req.logprobs is not None:
                lp = lps[i] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            choices.append({"index": i, "text": text, "finish_reason": reasons[i], "logprobs": lp})
        return self.body(choices, self._usage(generated, cached))

    async def stream(self, request: Request) -> AsyncIterator[str]:
        n = len(self.prompt_of)
        generated, cached = [0] * n, [0] * n
        async for i, out in self.generation.outputs():
            generated[i] += len(out.token_ids)
            cached[i] = out.cached_tokens
            lp = self._logprobs(out) if self.req.logprobs is not None else None
            if out.text or lp or out.finished:
                yield self.chunk([{"index": i, "text": out.text, "logprobs": lp,
                                   "finish_reason": out.finish_reason if out.finished else None}])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield self.chunk([], usage_body(self._usage(generated, cached)))
        yield "data: [DONE]\n\n"
