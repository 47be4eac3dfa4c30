"""Sampling parameters, the per-sequence sampler (penalties, temperature, top-k, top-p, min-p, seed) and
the stop-string matcher."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

# temperatures below this sample greedily, as vLLM does: logits / 1e-300 overflow to inf and NaN
GREEDY_BELOW = 1e-5


class SamplingParamsError(ValueError):
    """A SamplingParams field with a value it cannot take; `field` names it (a server's 400 says which)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0            # 0 (or below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 (or 0) = off
    min_p: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] | list[str] | str | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    logprobs: int | None = None         # None: none; k >= 0: the sampled token's logprob and the top k
    ignore_eos: bool = False            # keep going past end-of-sequence tokens (benchmarks)
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit (OpenAI: -100..100)
    json_schema: dict | bool | None = None       # the answer is JSON valid for this schema (True: any object)
    grammar: str | None = None                   # or matches this llguidance grammar (Lark; structured.py)
    thinking_token_budget: int | None = None     # reasoning tokens before </think> is forced (thinking on)

    def __post_init__(self):
        def bad(name: str, why: str):
            raise SamplingParamsError(name, f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                          "repetition_penalty") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                bad(f.name, "must be a number")
            elif isinstance(v, float) and not math.isfinite(v):
                bad(f.name, "must be a finite number")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be an integer, -1 or 0 to disable, else >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer or None")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is not None and not all(isinstance(s, str) and s for s in stop):
            bad("stop", "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", tuple(stop or ()))
        ids = self.stop_token_ids
        if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad("stop_token_ids", "must be a list of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids or ()))
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k >= 0 and not isinstance(v, bool)
                    and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in bias.items()):
                bad("logit_bias", "must map token ids to numbers in [-100, 100]")
            object.__setattr__(self, "logit_bias", {k: float(v) for k, v in bias.items()} or None)
        if self.json_schema is not None and not (self.json_schema is True or isinstance(self.json_schema, dict)):
            bad("json_schema", "must be a JSON schema (dict) or True for any JSON object")
        if self.grammar is not None and (not isinstance(self.grammar, str) or self.json_schema is not None):
            bad("grammar", "must be a grammar string, and not given with json_schema")
        budget = self.thinking_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            bad("thinking_token_budget", "must be an integer >= 0")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be None or an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def greedy(logits: torch.Tensor):
    """The first index of the largest logit (as argmax), over the last dim: an int for one row, else a
    list. torch's max along a dim returns the same index and runs faster than argmax over 248,320 logits
    (docs/performance.md)."""
    idx = logits.max(-1).indices
    return int(idx) if idx.dim() == 0 else idx.tolist()


class StopMatcher:
    """The stop strings of one request, indexed once: finds them in text that grows at its end.

    Only a stop string that ends in the text added since the last search can be new (earlier text was
    searched already), so a search looks at the new end positions only: the last `k` characters before
    each one (k = the shortest stop's length, at most 8) pick, from a dict, the stops that can end there
    (longest first), and `str.startswith` confirms one. A search costs a dict lookup per new character,
    plus a comparison per stop that shares those k characters, whatever the number of stops."""

    KEY = 8

    def __init__(self, stops: Iterable[str]):
        stops = sorted(dict.fromkeys(stops), key=len, reverse=True)       # longest first
        if not stops or not all(stops):
            raise ValueError("StopMatcher needs non-empty stop strings")
        self.hold = len(stops[0]) - 1          # text that may be the start of a stop string still forming
        self.k = min(len(stops[-1]), self.KEY)
        self.by_tail: dict[str, list[str]] = {}
        for s in stops:
            self.by_tail.setdefault(s[-self.k:], []).append(s)

    def search(self, text: str, checked: int) -> tuple[int, str] | None:
        """The earliest stop string in `text` that ends past its first `checked` characters, and the
        longest of those starting there: (where it starts, the string), or None. `text[:checked]` must
        have been searched before (with no match): text is only ever appended to."""
        k, by_tail, best = self.k, self.by_tail, None
        for end in range(max(checked + 1, k), len(text) + 1):
            for s in by_tail.get(text[end - k:end], ()):
                at = end - len(s)
                if at >= 0 and text.startswith(s, at):       # the longest stop ending here starts first
                    if best is None or at <= best[0]:        # at an equal start, a later end is longer
                        best = (at, s)
                    break
        return best


class Sampler:
    """Picks the next token of one sequence from its logits [V] (fp32)."""

    def __init__(self, params: SamplingParams, device="cpu"):
        self.p = params
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed % 2 ** 64)       # any integer: the generator takes 64 bits
        else:
            self.gen.seed()
        self._bias: tuple | None = None        # ((size, dtype, device), ids or None, values): see _add_bias
        self._seen: list | None = None         # repetition_penalty's distinct ids: see _seen_ids

    def _add_bias(self, logits: torch.Tensor) -> None:
        """logits += logit_bias. Its tensors are made on first use, once per request (not per token): sorted
        ids and their values, or, for a bias over more than 1/8 of the vocabulary, one dense row (smaller
        than the dict it comes from; a plain add beats a scattered one there)."""
        key = (logits.shape[-1], logits.dtype, logits.device)
        if self._bias is None or self._bias[0] != key:
            n = logits.shape[-1]
            bias = sorted((i, v) for i, v in self.p.logit_bias.items() if i < n)   # padding rows: none
            ids = torch.tensor([i for i, _ in bias], dtype=torch.long, device=logits.device)
            values = torch.tensor([v for _, v in bias], dtype=logits.dtype, device=logits.device)
            if len(bias) > n // 8:
                ids, values = None, torch.zeros(n, dtype=logits.dtype, device=logits.device).index_put_((ids,), values)
            self._bias = (key, ids, values)
        _, ids, values = self._bias
        if ids is None:
            logits += values
        else:
            logits.index_add_(0, ids, values)            # ids are distinct (dict keys): one add each

    def _seen_ids(self, prompt_ids: list[int], output_ids: list[int], device) -> torch.Tensor:
        """The distinct ids of prompt and output: the prompt's gathered once per request, the output's new
        ones appended as they come (the engine only appends to output_ids; another list starts over)."""
        c = self._seen
        if c is None or c[0] is not prompt_ids or c[1] != len(prompt_ids) or c[2] > len(output_ids) or c[3] != device:
            ids = set(prompt_ids)
            buf = torch.tensor(sorted(ids) + [0] * 64, dtype=torch.long, device=device)
            c = self._seen = [prompt_ids, len(prompt_ids), 0, device, ids, buf, len(ids)]
        _, _, done, _, ids, buf, n = c
        new = [t for t in output_ids[done:] if t not in ids and not ids.add(t)]
        c[2] = len(output_ids)
        if new:
            if n + len(new) > len(buf):                     # room for as many again
                c[5] = buf = torch.cat([buf, torch.zeros(n + len(new), dtype=torch.long, device=device)])
            buf[n:n + len(new)] = torch.tensor(new, dtype=torch.long)
            c[6] = n = n + len(new)
        return buf[:n]

    def penalize(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        p = self.p
        if p.logit_bias:
            self._add_bias(logits)
        if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
            seen = self._seen_ids(prompt_ids, output_ids, logits.device)
            x = logits[seen]
            logits[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output_ids:
            ids = torch.tensor(output_ids, device=logits.device)
            counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        # extreme penalties overflow (x / 1e-30): keep numbers (a bias in [-100, 100] cannot overflow fp32)
        if p.repetition_penalty != 1.0:
            logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
        return logits

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p filters; returns the distribution sampled from."""
        p = self.p
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(-1)
            drop = (cum - sorted_p) > p.top_p                                  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                 allowed: torch.Tensor | None = None, draft: int | None = None) -> int:
        """`allowed`: a boolean mask of the tokens a grammar lets through (the others get -inf first).
        `draft`: a token proposed by speculative decoding. It is kept with probability p(draft), else the
        token is drawn from p without it: the result is distributed exactly as p (a deterministic draft's
        rejection sampling), so speculation never changes what is sampled, only how fast."""
        logits = logits.float().clone()
        if allowed is not None:
            logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits = self.penalize(logits, prompt_ids, output_ids)
        if self.p.greedy:
            return greedy(logits)
        ids = None
        if 0 < self.p.top_k < logits.shape[-1]:  # the same distribution, but sort k values, not the vocabulary
            logits, ids = torch.topk(logits, self.p.top_k)
        probs = self.probs(logits)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:   # e.g. every logit -inf
            pick = int(logits.argmax())
            return pick if ids is None else int(ids[pick])
        if draft is not None:
            where = draft if ids is None else next(iter((ids == draft).nonzero().flatten().tolist()), None)
            if where is not None and 0 <= where < probs.shape[-1]:
                if float(torch.rand((), generator=self.gen, device=probs.device)) < float(probs[where]):
                    return draft
                probs = probs.clone()
                probs[where] = 0.0                         # rejected: the rest of p, renormalised by multinomial
        pick = int(torch.multinomial(probs, 1, generator=self.gen))
        return pick if ids is None else int(ids[pick])
