"""Timing of one generation, as `ollama run --verbose` reports it: prompt tokens (and how many came from the
prefix cache), prompt rate, generated tokens, decode rate, time to first token.

`format_stats` makes the line from timestamps and token counts; `StreamTimer` takes those timestamps from a
`generate_stream` of StepOutputs, without touching the engine:

    timer = StreamTimer(prompt_tokens=len(inputs.ids))
    for out in timer.wrap(llm.generate_stream(inputs, params)):
        ...
    print(timer.line(), file=sys.stderr)

The prompt rate is the prompt tokens the model ran (not those taken from the cache) over the time to the first
token; the decode rate is the tokens after the first over the time after the first.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if tokens > 0 and seconds > 0 else "- tok/s"


def format_stats(prompt_tokens: int, generated_tokens: int, start: float, first_token: float | None, end: float,
                 cached_tokens: int | None = None, load_s: float | None = None) -> str:
    """One line of generation stats. Times are time.perf_counter() values: start when the request was
    submitted, first_token when the first generated token arrived (None: none did), end when the last did
    (or the request finished). cached_tokens: prompt tokens taken from the prefix cache, if known; load_s:
    time spent setting the engine up before start, shown when given."""
    computed = prompt_tokens - (cached_tokens or 0)
    ttft = None if first_token is None else first_token - start
    prompt = f"prompt {prompt_tokens} tokens" + (f" ({cached_tokens} cached)" if cached_tokens else "")
    prompt += ", " + (_rate(computed, ttft) if ttft is not None else "- tok/s")
    gen = f"generated {generated_tokens} tokens, "
    gen += _rate(generated_tokens - 1, end - first_token) if first_token is not None else "- tok/s"
    parts = [prompt, gen, f"first token {ttft:.3f} s" if ttft is not None else "no token",
             f"total {end - start:.2f} s"]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    return "[stats] " + " | ".join(parts)


class StreamTimer:
    """Timestamps of a stream of StepOutputs (qwen36.engine): call start() when the request is submitted (or
    let wrap() do it), observe() on each output; line() formats them with format_stats."""

    def __init__(self, prompt_tokens: int, load_s: float | None = None):
        self.prompt_tokens, self.load_s = prompt_tokens, load_s
        self.generated = 0
        self.cached: int | None = None
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def observe(self, out) -> None:
        now = time.perf_counter()
        if self.t_start is None:
            self.t_start = now
        if out.token_ids:
            self.generated += len(out.token_ids)
            if self.t_first is None:
                self.t_first = now
        self.cached = max(self.cached or 0, getattr(out, "cached_tokens", 0) or 0)
        self.t_end = now

    def wrap(self, stream: Iterable) -> Iterator:
        """Yield stream's outputs, observing each; the clock starts at the first next(). Closing this
        generator closes the stream (which aborts the request)."""
        self.start()
        try:
            for out in stream:
                self.observe(out)
                yield out
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def line(self) -> str:
        start = self.t_start if self.t_start is not None else time.perf_counter()
        end = self.t_end if self.t_end is not None else time.perf_counter()
        return format_stats(self.prompt_tokens, self.generated, start, self.t_first, end,
                            cached_tokens=self.cached, load_s=self.load_s)
