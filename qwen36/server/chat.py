"""The protocol-neutral chat core: one assistant turn of every chat API.

An adapter (OpenAI chat completions in `openai.py`, Anthropic Messages in `anthropic.py`, Responses in
`responses.py`) translates its request into a `ChatCall` and runs a `ChatTurn`: the conversation is rendered
(late system messages merged), the answer constrained (JSON schema, strict or forced tool calls, thinking
budget), the prompt built (media bounded before any pixel is decoded), n engine requests submitted, and the
answer comes back as typed events:

    ReasoningDelta / TextDelta / ToolCallDelta   parsed pieces of choice `choice`, as they stream
    Logprobs                                     logprobs of tokens that showed nothing yet
    Done                                         the choice's end: finish reason, stop sequence, usage
                                                 (prompt, completion, cached and reasoning tokens), logprobs

(`events()`), or as whole parsed answers (`answers()`: each a ChatResult with its Done). Everything an
adapter reports is in these values; nothing is left behind in attributes as a side effect of iterating.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Union

from ..chat import ChatTemplateError
from ..engine import StepOutput
from ..image import ContextTooLong, MediaCancelled
from ..inputs import ChatPrompt, PromptInputs, render_chat_prompt
from ..parsers import AssistantStreamParser, ChatResult, parse_assistant
from ..structured import GrammarError, json_grammar, tool_call_grammar
from .context import ServingContext
from .generation import Generation, max_tokens_for, sampling_params
from .protocol import APIError, ContextLengthError
from .runner import Submission


@dataclass
class ChatCall:
    """One chat turn as every API asks for it.

    messages: chat messages as dicts (roles system / developer / user / assistant / tool; content a string
      or content parts, media included; assistant `reasoning_content` and `tool_calls`).
    tools: function tools ({"type": "function", "function": {name, description, parameters, strict}}).
    tool_choice: "auto" | "none" | "required" | "function" (then `tool_name` names it).
    response_schema: the answer's JSON schema (True: any JSON object), None for text.
    template_kwargs: the request's chat template kwargs, over the server's defaults; `enable_thinking` (an
      effort or thinking switch) sits under them. thinking_budget: an explicit thinking-token budget;
      effort_budget: one that applies only when thinking is on and no explicit budget is given.
    sampling: SamplingParams fields (generation.SAMPLING_FIELDS) the request set; seed: choice c gets seed + c.
    logprobs: top logprobs per token (0: the sampled token's only), None for none."""
    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    response_schema: dict | bool | None = None
    template_kwargs: dict = field(default_factory=dict)
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    effort_budget: int | None = None
    sampling: dict = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    n: int = 1
    logprobs: int | None = None
    cache_salt: str = ""


# ---- events --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0                     # prompt tokens taken from the prefix cache
    reasoning_tokens: int = 0                  # completion tokens before </think>

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def total_usage(usages: list[Usage], prompt_of: list[int] | None = None) -> Usage:
    """One request's usage from its choices': every prompt counted once (`prompt_of[c]`: choice c's prompt;
    None: one prompt), completions summed, cached tokens the best choice's per prompt."""
    prompt_of = prompt_of or [0] * len(usages)
    prompts: dict[int, Usage] = {}
    for p, u in zip(prompt_of, usages):
        if p not in prompts or u.cached_tokens > prompts[p].cached_tokens:
            prompts[p] = u
    return Usage(sum(u.prompt_tokens for u in prompts.values()), sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in prompts.values()), sum(u.reasoning_tokens for u in usages))


@dataclass(frozen=True)
class ReasoningDelta:
    choice: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()    # of the engine output this piece came from (first piece only)


@dataclass(frozen=True)
class TextDelta:
    choice: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """One whole tool call (the parser releases a call once it is complete)."""
    choice: int
    index: int
    id: str
    name: str
    arguments: str                             # a JSON object
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Logprobs:
    """Logprobs of an engine output that released nothing to show (yet)."""
    choice: int
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Done:
    choice: int
    finish_reason: str                         # "stop" | "length" | "tool_calls" | "error"
    stop_sequence: str | None                  # the stop string that ended it, if one did
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()    # every token's, when asked for


Event = Union[ReasoningDelta, TextDelta, ToolCallDelta, Logprobs, Done]


@dataclass
class Answer:
    """One whole choice: the parsed answer and how it ended."""
    result: ChatResult
    done: Done


def delta_events(choice: int, delta: dict, logprobs: tuple = ()) -> list[Event]:
    """A parser delta (AssistantStreamParser: `reasoning_content`, `content` or `tool_calls`) as events."""
    out: list[Event] = []
    if "reasoning_content" in delta:
        out.append(ReasoningDelta(choice, delta["reasoning_content"]))
    if "content" in delta:
        out.append(TextDelta(choice, delta["content"]))
    for call in delta.get("tool_calls", ()):
        out.append(ToolCallDelta(choice, call.get("index", 0), call["id"], call["function"]["name"],
                                 call["function"]["arguments"]))
    if out and logprobs:
        out[0] = replace(out[0], logprobs=logprobs)
    return out


def tool_call_dict(e: ToolCallDelta) -> dict:
    """A tool call in the chat messages' shape (what the template and the OpenAI API use)."""
    return {"index": e.index, "id": e.id, "type": "function", "function": {"name": e.name, "arguments": e.arguments}}


class _Choice:
    """Per choice: what its engine outputs added up to."""

    def __init__(self, thinking: bool):
        self.generated = self.cached = self.reasoning = 0
        self.in_reasoning = thinking           # the prompt opens <think> when thinking
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.tool_calls = False

    def take(self, out: StepOutput, think_end: int | None, logprobs: tuple) -> None:
        self.generated += len(out.token_ids)
        self.cached = out.cached_tokens
        for t in out.token_ids if self.in_reasoning else ():
            if t == think_end:
                self.in_reasoning = False
                break
            self.reasoning += 1
        self.logprobs += logprobs
        if out.finished:
            self.finish_reason, self.stop_sequence = out.finish_reason, out.stop_sequence

    def done(self, index: int, prompt_len: int) -> Done:
        reason = "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason
        return Done(index, reason, self.stop_sequence,
                    Usage(prompt_len, self.generated, self.cached, self.reasoning), tuple(self.logprobs))


class ChatTurn:
    """One chat turn on the engine. Built from a ChatCall (quick: nothing rendered); `prepare()` checks the
    constraint and the tool choice, builds the prompt and submits; then `events()` or `answers()`."""

    def __init__(self, call: ChatCall, ctx: ServingContext):
        self.call, self.ctx = call, ctx
        kwargs = {**(ctx.config.default_chat_template_kwargs or {}),
                  **({} if call.enable_thinking is None else {"enable_thinking": call.enable_thinking}),
                  **call.template_kwargs}
        self.thinking = kwargs.get("enable_thinking", True) is not False
        self.preserve = kwargs.get("preserve_thinking", False) is True
        self.tools = call.tools if call.tools and call.tool_choice != "none" else None
        self.max_calls = 1 if call.parallel_tool_calls is False else 1 << 30   # OpenAI's: the first call only
        self.generation = Generation(ctx)
        self.cancel = threading.Event()        # set when the client left: media work stops
        self.prompt: ChatPrompt | None = None
        self.prompt_ids: list[int] = []
        self.has_media = False

    @property
    def started(self) -> bool:
        return self.generation.started

    # ---- checks, once, before any rendering or media work
    def constraint(self) -> dict:
        """What the answer is held to: a JSON schema, a grammar of strict tool calls (tool_choice required or
        named, or tools marked strict), a thinking budget. A schema or tool the grammar engine cannot use, a
        forced call without tools or naming an unknown tool, is a 400 naming the field."""
        call, out = self.call, {}
        budget = call.thinking_budget
        if budget is None and self.thinking:
            budget = call.effort_budget
        if budget is not None:
            out["thinking_token_budget"] = budget
        schema = call.response_schema
        forced = bool(self.tools) and call.tool_choice in ("required", "function")
        strict = [t for t in self.tools or () if t["function"].get("strict") is True]
        if schema is not None and (forced or strict):
            raise APIError("response_format cannot be combined with a required or strict tool call",
                           param="response_format")
        if call.tool_choice in ("required", "function") and not call.tools:
            raise APIError("tool_choice asks for a tool call, but no tools were given", param="tool_choice")
        allowed = self.tools if forced else strict
        if forced and call.tool_choice == "function":
            allowed = [t for t in self.tools if t["function"]["name"] == call.tool_name]
            if not allowed:
                raise APIError(f"tool_choice names function {call.tool_name!r}, which is not in tools",
                               param="tool_choice")
        grammar, param, backend = None, "response_format", self.ctx.grammar
        try:
            if schema is not None:
                grammar = json_grammar(schema)
            elif (forced or strict) and backend is not None:   # (without one: the call is only opened)
                param = "tools"
                grammar = tool_call_grammar(allowed, required=forced,
                                            max_calls=1 if call.parallel_tool_calls is False else None)
            if grammar is not None:
                if backend is None:
                    raise GrammarError("this checkpoint has no tokenizer.json for the grammar engine")
                backend.check(grammar, "JSON schema" if schema is not None else "tool schema")
        except GrammarError as e:
            raise APIError(f"{param}: {e}", param=param) from None
        if grammar is not None:
            out["grammar"] = grammar
        return out

    def _forced_call(self) -> tuple[int | None, list[int]] | None:
        """tool_choice "required" / a named function: the turn's answer is made to open a tool call (right
        after </think> when thinking, at once otherwise); the model writes the rest."""
        call, tokenizer = self.call, self.ctx.tokenizer
        if not self.tools or call.tool_choice not in ("required", "function"):
            return None
        if call.tool_choice == "required":
            text = "<tool_call>\n<function="
        else:
            text = f"<tool_call>\n<function={tokenizer.escape.escape(call.tool_name)}>\n"   # the name is text
        if self.thinking:
            return self.ctx.think_end_id, tokenizer.encode_escaped("\n\n" + text)
        return None, tokenizer.encode_escaped(text)

    # ---- the prompt
    def _render(self) -> ChatPrompt:
        """The conversation rendered (late system and developer messages joined to the leading one)."""
        try:
            return render_chat_prompt(self.ctx.template, self.ctx.tokenizer.escape, self.call.messages, self.tools,
                                      enable_thinking=self.thinking, preserve_thinking=self.preserve,
                                      merge_system=True)
        except ChatTemplateError as e:
            raise APIError(f"messages: {e}", param="messages") from None

    async def _off_loop(self, fn, media: bool = False):
        """Run fn off the event loop: media work (decoding and the tower) in the media pool, the rest
        (rendering, tokenizing, reading media headers: it scales with the request) on the default executor."""
        try:
            if media and self.ctx.media_pool is not None:
                return await self.ctx.media_pool.run(fn)
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

    async def build_inputs(self) -> PromptInputs:
        """Render the conversation and build its prompt inputs: media sized from their headers and checked
        against the context and the per-request limits before any pixel is decoded (quick, so refusals never
        wait for media work), then decoded and run through the vision tower in the media pool; all of it off
        the event loop, stopped when the client leaves."""
        ctx = self.ctx

        def plan():
            self.prompt = self._render()
            return ctx.media.plan_prompt(self.prompt.text, ctx.media.parts(self.prompt.messages), ctx.media_policy,
                                         ctx.max_model_len, escaped=True, cancel=self.cancel)
        planned = await self._off_loop(plan)
        inputs = await self._off_loop(lambda: ctx.media.realize(planned, self.cancel), media=bool(planned.plans))
        self.has_media = inputs.mm is not None
        return inputs

    async def count_tokens(self) -> int:
        """The prompt's token count, media counted from their headers (no decoding, no vision tower)."""
        ctx = self.ctx

        def work():
            prompt = self._render()
            return ctx.media.count_tokens(prompt.text, prompt.messages, ctx.media_policy, escaped=True)
        return await self._off_loop(work)

    async def prepare(self) -> None:
        """Checks (400s before any rendering or image work), the prompt, then every choice submitted."""
        call = self.call
        constraint = self.constraint()
        force = None if "grammar" in constraint else self._forced_call()
        inputs = await self.build_inputs()
        self.prompt_ids = inputs.ids
        max_tokens = max_tokens_for(self.ctx, len(inputs.ids), call.max_tokens)
        params = [sampling_params(self.ctx, call.sampling, max_tokens, call.logprobs,
                                  None if call.seed is None else call.seed + c, constraint)   # distinct, reproducible
                  for c in range(call.n)]
        await self.generation.submit([Submission(inputs.ids, p, force, inputs.mm, call.cache_salt) for p in params])

    def abort(self) -> None:
        self.generation.abort()

    # ---- the answer
    def _logprobs(self, out: StepOutput) -> tuple[TokenLogprob, ...]:
        if self.call.logprobs is None or not out.logprobs:
            return ()
        decode = self.ctx.tokenizer.decode
        return tuple(TokenLogprob(decode([lp["token_id"]]), lp["logprob"], tuple((decode([t]), v) for t, v in lp["top"]))
                     for lp in out.logprobs)

    async def events(self) -> AsyncIterator[Event]:
        """The answer as it streams: per engine output its parsed pieces (the first carrying the output's
        logprobs, or a Logprobs event when nothing shows yet), and a Done per choice once it finished (an
        engine failure: finish_reason "error")."""
        n = len(self.generation.rids)
        parsers = [AssistantStreamParser(self.tools, thinking=self.thinking) for _ in range(n)]
        choices = [_Choice(self.thinking) for _ in range(n)]
        think_end = self.ctx.think_end_id
        async for i, out in self.generation.outputs():
            c = choices[i]
            lps = self._logprobs(out)
            c.take(out, think_end, lps)
            if i == 0:
                c.text.append(out.text)
            deltas = parsers[i].feed(out.text) if out.text else []
            if out.finished:
                deltas += parsers[i].finish()
            events: list[Event] = []
            for d in deltas:
                if "tool_calls" in d:
                    d = {**d, "tool_calls": [t for t in d["tool_calls"] if t["index"] < self.max_calls]}
                    c.tool_calls |= bool(d["tool_calls"])
                events += delta_events(i, d)
            if events and lps:
                events[0] = replace(events[0], logprobs=lps)
            elif lps:
                events.append(Logprobs(i, lps))
            for e in events:
                yield e
            if out.finished:
                yield c.done(i, len(self.prompt_ids))
        self._warm_next_turn("".join(choices[0].text) if choices else "", choices[0].finish_reason if choices else None)

    async def answers(self) -> list[Answer]:
        """Every choice, parsed, once all are finished (an engine failure is an APIError 500)."""
        n = len(self.generation.rids)
        choices = [_Choice(self.thinking) for _ in range(n)]
        async for i, out in self.generation.outputs():
            choices[i].text.append(out.text)
            choices[i].take(out, self.ctx.think_end_id, self._logprobs(out))
        if any(c.finish_reason == "error" for c in choices):
            raise APIError("the engine failed while generating; the request was dropped", 500, type_="server_error")
        answers = []
        for i, c in enumerate(choices):
            result = parse_assistant("".join(c.text), self.tools, thinking=self.thinking)
            result.tool_calls = result.tool_calls[:self.max_calls]
            c.tool_calls = bool(result.tool_calls)
            answers.append(Answer(result, c.done(i, len(self.prompt_ids))))
        self._warm_next_turn("".join(choices[0].text), choices[0].finish_reason)
        return answers

    def _warm_next_turn(self, text: str, reason: str | None) -> None:
        """After a final answer (no tool call) the client's next request adds a user message, and the
        template then drops the reasoning of this task's turns: prefill that history now, in the background
        (the engine runs it only while idle and stops it when a request arrives)."""
        ctx = self.ctx
        if (not ctx.config.background_prefill or self.has_media or self.prompt is None
                or reason not in ("stop", "length")):
            return
        result = parse_assistant(text, self.tools, thinking=self.thinking)
        if result.tool_calls:                        # a tool result comes next: the history is kept as it is
            return
        answer = {"role": "assistant", "content": result.content or ""}
        if result.reasoning_content:
            answer["reasoning_content"] = result.reasoning_content
        messages = self.prompt.messages + [answer, {"role": "user", "content": "."}]

        def work():
            try:
                text = ctx.template.render(messages, tools=self.tools, add_generation_prompt=False,
                                           enable_thinking=self.thinking, preserve_thinking=self.preserve,
                                           escape=ctx.tokenizer.escape)
            except (ChatTemplateError, ValueError):   # a history the template refuses: nothing to warm
                return
            # escaped form: the last <|im_start|>user found is the template's, not one quoted in a message
            ctx.runner.warm(ctx.tokenizer.encode_escaped(text[:text.rfind("<|im_start|>user")]), self.call.cache_salt)

        asyncio.get_running_loop().run_in_executor(None, work)
