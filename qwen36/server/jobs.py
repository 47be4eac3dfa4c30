"""Requests in flight: a job validates one API request, queues its engine requests and gathers their outputs.

`ChatJob` is the one path of every chat-style API: it renders the conversation (merging late system
messages), submits, and hands back parsed choices (`choices`) or parsed deltas as they stream (`deltas`).
The OpenAI chat completions shape is written here; the Anthropic Messages and OpenAI Responses adapters
(`anthropic.py`, `responses.py`) translate their requests into a `ChatCompletionRequest` and format the
same choices and deltas in their own shapes.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..chat import ChatTemplate, ChatTemplateError, merge_system_messages
from ..engine import StepOutput
from ..image import ContextTooLong, MediaCancelled
from ..inputs import MediaPolicy
from ..llm import LLM
from ..parsers import AssistantStreamParser, ChatResult, parse_assistant
from ..sampling import SamplingParams
from ..structured import GrammarError, json_grammar, tool_call_grammar
from .protocol import APIError, ChatCompletionRequest, ContextLengthError, NamedToolChoice, effort_thinking, response_schema
from .runner import EngineRunner, Overloaded, Submission, now


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 << 20
    default_chat_template_kwargs: dict | None = None
    allowed_local_media_path: str | None = None   # file:// media URLs allowed inside this directory only
    max_image_pixels: int | None = None           # caps on the pixel budgets (the vision tower's cost)
    max_video_pixels: int | None = None
    background_prefill: bool = True               # prefill the next turn's history while idle (prefix cache)
    responses_store_size: int = 256               # /v1/responses kept for previous_response_id (LRU)
    responses_store_bytes: int = 64 << 20         # and the bytes they may hold (media are not stored)
    limit_images: int | None = None               # media items per request (--limit-mm-per-prompt)
    limit_videos: int | None = None
    max_waiting: int | None = 256                 # engine requests in line behind the running ones, then 429
    media_workers: int = 2                        # threads decoding media and running the tower
    media_queue: int = 8                          # media requests in flight (running or waiting) before 429
    request_timeout: float = 60.0                 # seconds to receive a request's body
    allowed_hosts: tuple[str, ...] = ()           # Host names accepted besides loopback (keyless loopback server)
    host: str = "127.0.0.1"                       # the address the server listens on


def _lower_priority() -> None:
    """This thread (and the compute threads it starts, which inherit it) at nice 10: when media work and the
    engine want the same cores, the engine's steps (everyone's tokens) go first (Linux nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):                     # not Linux, or not permitted: same priority
        pass


class MediaPool:
    """Where media work runs: its own threads (decoding, resizing, the vision tower), so a slow or hostile
    medium never holds the threads that render everyone else's prompts, with a bounded line (429 past it)."""

    def __init__(self, workers: int, queue: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="qwen36-media",
                                       initializer=_lower_priority)
        self.limit, self.in_flight = max(1, queue), 0

    async def run(self, fn):
        if self.in_flight >= self.limit:
            raise Overloaded(f"{self.in_flight} requests with images or videos are being prepared (limit "
                             f"{self.limit}); retry shortly", retry_after=2)
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        finally:
            self.in_flight -= 1


@dataclass
class Choice:
    """One parsed answer of a chat job."""
    index: int
    result: ChatResult
    finish_reason: str                            # "stop" | "length" | "tool_calls"
    stop_sequence: str | None = None              # the stop string that ended it, if one did
    logprobs: list[dict] = field(default_factory=list)


def sampling_params(req, llm: LLM, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                    choice: int, constraint: dict | None = None) -> SamplingParams:
    fields = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                          "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids")
              if getattr(req, k) is not None}
    if req.seed is not None:
        fields["seed"] = req.seed + choice                     # n choices: distinct but reproducible
    if req.logit_bias:
        fields["logit_bias"] = _logit_bias(req.logit_bias, llm.config.text.vocab_size)
    fields["ignore_eos"] = req.ignore_eos
    limit = llm.engine().max_model_len - prompt_len
    if limit <= 0:
        raise ContextLengthError(prompt_len, llm.engine().max_model_len)
    fields["max_tokens"] = max_tokens or limit
    fields["logprobs"] = logprobs
    fields.update(constraint or {})                            # json_schema / grammar / thinking_token_budget
    try:
        return llm.default_sampling_params(**fields)
    except ValueError as e:
        msg = str(e)                                           # "SamplingParams.<field>=<value>: why"
        field = msg.split("=")[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
        raise APIError(msg, param=field) from None


def _logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as JSON object keys) -> a bias in [-100, 100]."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise APIError(f"logit_bias: {key!r} is not a token id (0..{vocab - 1})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(f"logit_bias[{key!r}] = {value} is outside [-100, 100]", param="logit_bias")
        out[int(key)] = value
    return out


class _Job:
    """One HTTP request: n engine requests, their outputs merged into one response or SSE stream."""
    object_name = ""

    def __init__(self, req, config: ServerConfig, tokenizer, llm: LLM, runner: EngineRunner):
        self.req, self.config, self.tokenizer, self.llm, self.runner = req, config, tokenizer, llm, runner
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.rids: list[str] = []
        self.queue: asyncio.Queue | None = None
        self.generated: dict[str, int] = {}                    # request id -> tokens generated
        self.cancel = threading.Event()                        # set when the client left: media work stops
        self.cached: dict[str, int] = {}                       # request id -> prompt tokens from the prefix cache

    async def submit(self, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                     force: tuple[int | None, list[int]] | None = None, mm=None,
                     constraint: dict | None = None) -> None:
        self.prompts = prompts
        self.prompt_of = [i for i in range(len(prompts)) for _ in range(self.req.n)]   # per choice: its prompt
        subs = [Submission(p, sampling_params(self.req, self.llm, len(p), max_tokens, logprobs, c, constraint),
                           force, mm, self.req.cache_salt or "")
                for p in prompts for c in range(self.req.n)]   # validate everything before queueing anything
        self.t0 = now()
        self.queue = asyncio.Queue()
        try:
            self.rids = await self.runner.submit(subs, self.queue)
        except ValueError as e:
            raise APIError(str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None

    def abort(self) -> None:
        for rid in self.rids:
            self.runner.abort(rid)

    async def outputs(self, request: Request) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) as they arrive, until every choice finished. A client that leaves cancels
        the task this runs in (the server watches for the disconnect, streaming or not): every unfinished
        choice is aborted then."""
        index = {rid: i for i, rid in enumerate(self.rids)}
        pending = set(self.rids)
        first = {}
        try:
            while pending:
                out = await self.queue.get()
                i = index[out.request_id]
                if i not in first and out.token_ids:
                    first[i] = now()
                    self.runner.metrics.ttft.observe(first[i] - self.t0)
                if out.finished:
                    pending.discard(out.request_id)
                    self.runner.finished(out.request_id)
                    self._tpot(first.get(i), out)
                yield i, out
        finally:
            for rid in pending:
                self.runner.abort(rid)                         # frees slots of anything unfinished at once

    async def collect(self, request: Request) -> tuple[list[str], list[str], list[list[dict]]]:
        """Whole texts, finish reasons and logprob entries of every choice (non-streaming responses)."""
        texts, reasons, entries = [""] * len(self.rids), ["stop"] * len(self.rids), [[] for _ in self.rids]
        self.stops = [None] * len(self.rids)
        async for i, out in self.outputs(request):
            self.count(out)
            texts[i] += out.text
            entries[i] += self.logprob_entries(out)
            if out.finished:
                reasons[i], self.stops[i] = out.finish_reason, out.stop_sequence
        if "error" in reasons:
            raise APIError("the engine failed while generating; the request was dropped", 500, type_="server_error")
        return texts, reasons, entries

    def _tpot(self, first: float | None, out: StepOutput) -> None:
        if first is not None and out.request_id in self.generated and self.generated[out.request_id] > 1:
            self.runner.metrics.tpot.observe((now() - first) / (self.generated[out.request_id] - 1))

    def count(self, out: StepOutput) -> None:
        self.generated[out.request_id] = self.generated.get(out.request_id, 0) + len(out.token_ids)
        self.cached[out.request_id] = out.cached_tokens

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(self.generated.values())
        cached = [0] * len(self.prompts)                       # per prompt: the best of its n choices
        for rid, i in zip(self.rids, self.prompt_of):
            cached[i] = max(cached[i], self.cached.get(rid, 0))
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": sum(cached)}}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": self.object_name + ".chunk" if self.prefix == "chatcmpl" else self.object_name,
                "created": self.created, "model": self.config.served_model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def logprob_entries(self, out: StepOutput) -> list[dict]:
        entries = []
        for lp in out.logprobs:
            tok = self.tokenizer.decode([lp["token_id"]])
            entries.append({"token": tok, "logprob": lp["logprob"], "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": self.tokenizer.decode([t]), "logprob": v,
                                              "bytes": list(self.tokenizer.decode([t]).encode())}
                                             for t, v in lp["top"]]})
        return entries


class ChatJob(_Job):
    prefix, object_name = "chatcmpl", "chat.completion"

    def __init__(self, req: ChatCompletionRequest, config, template: ChatTemplate, tokenizer, llm, runner,
                 media_pool: MediaPool | None = None):
        super().__init__(req, config, tokenizer, llm, runner)
        self.template, self.media_pool = template, media_pool
        # reasoning_effort: thinking on/off and a budget, under an explicit enable_thinking / thinking_token_budget
        on, self.effort_budget = effort_thinking(req.reasoning_effort, "reasoning_effort") \
            if req.reasoning_effort is not None else (None, None)
        kwargs = {**(config.default_chat_template_kwargs or {}), **({} if on is None else {"enable_thinking": on}),
                  **(req.chat_template_kwargs or {})}
        self.thinking = kwargs.get("enable_thinking", True) is not False
        self.preserve = kwargs.get("preserve_thinking", False) is True
        use_tools = bool(req.tools) and req.tool_choice != "none"
        self.tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None

    def _render(self):
        """(prompt text, messages, media policy): the conversation rendered, late system (and developer)
        messages joined to the leading one (agents send reminders that way)."""
        media = self.llm.media
        messages = merge_system_messages(media.normalize([m.model_dump(exclude_none=True) for m in self.req.messages]))
        self.messages = messages
        try:
            prompt = self.template.render(messages, tools=self.tools, add_generation_prompt=True,
                                          enable_thinking=self.thinking, preserve_thinking=self.preserve,
                                          escape=self.tokenizer.escape)
        except ChatTemplateError as e:
            raise APIError(f"messages: {e}", param="messages") from None
        c = self.config
        policy = MediaPolicy(allow_paths=False, allowed_local_dir=c.allowed_local_media_path,
                             max_image_pixels=c.max_image_pixels, max_video_pixels=c.max_video_pixels,
                             clamp=True, limit_images=c.limit_images, limit_videos=c.limit_videos)
        return prompt, messages, policy

    async def _off_loop(self, fn, media: bool = False):
        """Run fn off the event loop: media work (decoding and the tower) in the media pool, the rest
        (rendering, tokenizing, reading media headers: it scales with the request) on the default executor."""
        try:
            if media and self.media_pool is not None:
                return await self.media_pool.run(fn)
            return await asyncio.to_thread(fn)
        except asyncio.CancelledError:                          # the client left: the media work stops too
            self.cancel.set()
            raise
        except ContextTooLong as e:
            raise ContextLengthError(e.prompt_tokens, e.limit, str(e)) from None
        except MediaCancelled:
            raise asyncio.CancelledError from None
        except ValueError as e:                                 # MediaError and placeholder/media mismatches
            raise APIError(str(e), param="messages") from None

    async def build_inputs(self):
        """Render the conversation and build its prompt inputs: media sized from their headers and checked
        against the context and the per-request limits before any pixel is decoded (quick, so refusals never
        wait for media work), then decoded and run through the vision tower in the media pool; all of it off
        the event loop, stopped when the client leaves."""
        media, limit = self.llm.media, self.runner.engine.max_model_len

        def plan():
            prompt, messages, policy = self._render()
            return media.plan_prompt(prompt, media.parts(messages), policy, limit, escaped=True, cancel=self.cancel)
        planned = await self._off_loop(plan)
        inputs = await self._off_loop(lambda: media.realize(planned, self.cancel), media=bool(planned.plans))
        self.has_media = inputs.mm is not None
        return inputs

    async def count_tokens(self) -> int:
        """The prompt's token count, media counted from their headers (no decoding, no vision tower)."""
        media = self.llm.media

        def work():
            prompt, messages, policy = self._render()
            return media.count_tokens(prompt, messages, policy, escaped=True)
        return await self._off_loop(work)

    async def prepare(self) -> None:
        req = self.req
        constraint = self._constraint(req)                     # bad schemas and tool choices: 400s before
        force = None if "grammar" in constraint else self._forced_call(req)   # any rendering or image work
        inputs = await self.build_inputs()
        top = req.top_logprobs if req.logprobs else None
        await self.submit([inputs.ids], req.max_completion_tokens or req.max_tokens,
                          (top or 0) if req.logprobs else None, force, inputs.mm, constraint)

    def _constraint(self, req: ChatCompletionRequest) -> dict:
        """What the answer is held to: a JSON schema (response_format), a grammar of strict tool calls
        (tool_choice required or named, or tools marked strict), a thinking budget. Checked here: a schema
        or tool the grammar engine cannot use is a 400 naming it."""
        out: dict = {}
        budget = req.thinking_token_budget
        if budget is None and self.thinking:
            budget = self.effort_budget
        if budget is not None:
            out["thinking_token_budget"] = budget
        schema = response_schema(req.response_format)
        choice = req.tool_choice
        forced = self.tools and (choice == "required" or isinstance(choice, NamedToolChoice))
        strict = [t for t in self.tools or () if t["function"].get("strict") is True]
        if schema is not None and (forced or strict):
            raise APIError("response_format cannot be combined with a required or strict tool call",
                           param="response_format")
        grammar, param = None, "response_format"
        backend = self.runner.engine.grammar
        try:
            if schema is not None:
                grammar = json_grammar(schema)
            elif (forced or strict) and backend is not None:   # (without one: the call is only opened)
                param = "tools"
                if isinstance(choice, NamedToolChoice):
                    name = choice.function.get("name")
                    allowed = [t for t in self.tools if t["function"]["name"] == name]
                    if not allowed:
                        raise APIError(f"tool_choice names function {name!r}, which is not in tools",
                                       param="tool_choice")
                else:
                    allowed = self.tools if forced else strict
                grammar = tool_call_grammar(allowed, required=bool(forced),
                                            max_calls=1 if req.parallel_tool_calls is False else None)
            if grammar is not None:
                if backend is None:
                    raise GrammarError("this checkpoint has no tokenizer.json for the grammar engine")
                backend.check(grammar, "JSON schema" if schema is not None else "tool schema")
        except GrammarError as e:
            raise APIError(f"{param}: {e}", param=param) from None
        if grammar is not None:
            out["grammar"] = grammar
        return out

    def _forced_call(self, req: ChatCompletionRequest) -> tuple[int | None, list[int]] | None:
        """tool_choice "required" / a named function: the turn's answer is made to open a tool call (right
        after </think> when thinking, at once otherwise); the model writes the rest."""
        choice = req.tool_choice
        if choice not in (None, "auto", "none") and not req.tools:
            raise APIError("tool_choice asks for a tool call, but no tools were given", param="tool_choice")
        if not self.tools or choice in (None, "auto", "none"):
            return None
        if choice == "required":
            text = "<tool_call>\n<function="
        else:
            name = choice.function.get("name")
            if name not in {t["function"]["name"] for t in self.tools}:
                raise APIError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
            text = f"<tool_call>\n<function={self.tokenizer.escape.escape(name)}>\n"   # the name is text
        if self.thinking:
            return self.tokenizer.token_id("</think>"), self.tokenizer.encode_escaped("\n\n" + text)
        return None, self.tokenizer.encode_escaped(text)

    @property
    def _max_calls(self) -> int:
        """parallel_tool_calls false: at most one tool call per answer (the first), as OpenAI defines it."""
        return 1 if self.req.parallel_tool_calls is False else 1 << 30

    def _finish_reason(self, reason: str, tool_calls: bool) -> str:
        return "tool_calls" if tool_calls and reason == "stop" else reason

    def _warm_next_turn(self, text: str, reason: str) -> None:
        """After a final answer (no tool call) the client's next request adds a user message, and the
        template then drops the reasoning of this task's turns: prefill that history now, in the background
        (the engine runs it only while idle and stops it when a request arrives)."""
        if not self.config.background_prefill or self.has_media or reason not in ("stop", "length"):
            return
        result = parse_assistant(text, self.tools, thinking=self.thinking)
        if result.tool_calls:                        # a tool result comes next: the history is kept as it is
            return
        answer = {"role": "assistant", "content": result.content or ""}
        if result.reasoning_content:
            answer["reasoning_content"] = result.reasoning_content

        def work():
            try:
                text = self.template.render(self.messages + [answer, {"role": "user", "content": "."}],
                                            tools=self.tools, add_generation_prompt=False,
                                            enable_thinking=self.thinking, preserve_thinking=self.preserve,
                                            escape=self.tokenizer.escape)
            except (ChatTemplateError, ValueError):   # a history the template refuses: nothing to warm
                return
            # escaped form: the last <|im_start|>user found is the template's, not one quoted in a message
            self.runner.warm(self.tokenizer.encode_escaped(text[:text.rfind("<|im_start|>user")]),
                             self.req.cache_salt or "")

        asyncio.get_running_loop().run_in_executor(None, work)

    async def choices(self, request: Request) -> list[Choice]:
        """Every choice, parsed, once all are finished (an engine failure is an APIError 500)."""
        texts, reasons, logprobs = await self.collect(request)
        out = []
        for i, text in enumerate(texts):
            result = parse_assistant(text, self.tools, thinking=self.thinking)
            result.tool_calls = result.tool_calls[:self._max_calls]
            out.append(Choice(i, result, self._finish_reason(reasons[i], bool(result.tool_calls)), self.stops[i],
                              logprobs[i]))
        self._warm_next_turn(texts[0], reasons[0])
        return out

    async def deltas(self, request: Request) -> AsyncIterator[tuple[int, dict | None, StepOutput]]:
        """(choice, delta, output) as the text streams: parser deltas (`reasoning_content`, `content` or
        `tool_calls`; an empty one for an output that shows nothing yet), then (choice, None, output) once
        a choice is finished, its reason in `finish_reasons[choice]` (an engine failure gives "error")."""
        parsers = [AssistantStreamParser(self.tools, thinking=self.thinking) for _ in self.rids]
        saw_tools = [False] * len(self.rids)
        self.finish_reasons: list[str | None] = [None] * len(self.rids)
        self.stops = [None] * len(self.rids)
        first_text, first_reason = [], None
        async for i, out in self.outputs(request):
            self.count(out)
            if i == 0:
                first_text.append(out.text)
                first_reason = out.finish_reason if out.finished else first_reason
            deltas = parsers[i].feed(out.text) if out.text else []
            if out.finished:
                deltas += parsers[i].finish()
            for d in deltas:
                if "tool_calls" in d:
                    d["tool_calls"] = [c for c in d["tool_calls"] if c["index"] < self._max_calls]
                    saw_tools[i] |= bool(d["tool_calls"])
            deltas = [d for d in deltas if d.get("tool_calls", True)]
            for d in deltas or [{}]:
                yield i, d, out
            if out.finished:
                self.finish_reasons[i] = self._finish_reason(out.finish_reason, saw_tools[i])
                self.stops[i] = out.stop_sequence
                yield i, None, out
        self._warm_next_turn("".join(first_text), first_reason)

    async def complete(self, request: Request) -> dict:
        choices = []
        for c in await self.choices(request):
            message = {"role": "assistant", "content": c.result.content,
                       "reasoning_content": c.result.reasoning_content}
            if c.result.tool_calls:
                message["tool_calls"] = c.result.tool_calls
            choices.append({"index": c.index, "message": message,
                            "logprobs": {"content": c.logprobs} if self.req.logprobs else None,
                            "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.config.served_model_name, "choices": choices, "usage": self.usage()}

    async def stream(self, request: Request) -> AsyncIterator[str]:
        for i in range(len(self.rids)):
            yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
        pending_lp: dict[int, dict | None] = {}
        last_out: dict[int, StepOutput] = {}
        async for i, d, out in self.deltas(request):
            if last_out.get(i) is not out:                       # a new engine output: its logprobs
                last_out[i] = out
                pending_lp[i] = {"content": self.logprob_entries(out)} if self.req.logprobs and out.logprobs else None
            if d:
                yield self.chunk([{"index": i, "delta": d, "logprobs": pending_lp[i], "finish_reason": None}])
                pending_lp[i] = None
                continue
            if d is not None:                                     # nothing to show: logprobs alone, if any
                if pending_lp[i] is not None:
                    yield self.chunk([{"index": i, "delta": {}, "logprobs": pending_lp[i], "finish_reason": None}])
                    pending_lp[i] = None
                continue
            if pending_lp.get(i) is not None:
                yield self.chunk([{"index": i, "delta": {}, "logprobs": pending_lp[i], "finish_reason": None}])
                pending_lp[i] = None
            yield self.chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": self.finish_reasons[i]}])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield self.chunk([], self.usage())
        yield "data: [DONE]\n\n"


class CompletionJob(_Job):
    prefix, object_name = "cmpl", "text_completion"

    async def prepare(self) -> None:
        p = self.req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError("prompt is empty", param="prompt")

        def tokenize():                                        # off the event loop: it scales with the request
            ids = []
            for x in prompts:
                t = self.tokenizer.encode(x) if isinstance(x, str) else list(x)
                if not t:
                    raise APIError("prompt has no tokens", param="prompt")
                bad = [v for v in t if not 0 <= v < self.llm.config.text.vocab_size]
                if bad:
                    raise APIError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
                ids.append(t)
            return ids
        await self.submit(await asyncio.to_thread(tokenize), self.req.max_tokens or 16, self.req.logprobs)

    def _logprobs(self, entries: list[dict]) -> dict:
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    async def complete(self, request: Request) -> dict:
        texts, reasons, entries = await self.collect(request)
        choices = []
        for i, text in enumerate(texts):
            if self.req.echo:
                text = self.tokenizer.decode(self.prompts[self.prompt_of[i]]) + text
            choices.append({"index": i, "text": text, "finish_reason": reasons[i],
                            "logprobs": self._logprobs(entries[i]) if self.req.logprobs is not None else None})
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.config.served_model_name, "choices": choices, "usage": self.usage()}

    async def stream(self, request: Request) -> AsyncIterator[str]:
        async for i, out in self.outputs(request):
            self.count(out)
            lp = self._logprobs(self.logprob_entries(out)) if self.req.logprobs is not None else None
            if out.text or lp or out.finished:
                yield self.chunk([{"index": i, "text": out.text, "logprobs": lp,
                                   "finish_reason": out.finish_reason if out.finished else None}])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield self.chunk([], self.usage())
        yield "data: [DONE]\n\n"
