"""What the engine keeps per request, what a step hands out, and the engine's counters."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..multimodal import MultimodalPrompt
from ..sampling import Sampler, SamplingParams, StopMatcher
from ..structured import Guide
from ..tokenizer import StreamDecoder
from .scheduler import SeqState


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
