"""What every request of one server shares, built once by `create_app`: the `ServingContext` (template,
tokenizer, media, context length, grammar backend, runner, sampling defaults) and the `MediaPool` where
media work runs. Jobs read these instead of reaching into `LLM` or across into the runner's engine."""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ..chat import ChatTemplate
from ..inputs import MediaInputs, MediaPolicy
from ..llm import LLM
from ..sampling import SamplingParams
from ..structured import GrammarBackend
from ..tokenizer import Tokenizer
from .config import ServerConfig
from .runner import EngineRunner, Overloaded


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
class ServingContext:
    """One server's shared parts. `sampling_params(**fields)` is SamplingParams over the checkpoint's
    generation_config.json defaults; `think_end_id` is `</think>`'s token id (reasoning tokens are counted
    up to it); `media_policy` is what a request's media may be and cost on this server."""
    config: ServerConfig
    runner: EngineRunner
    template: ChatTemplate
    tokenizer: Tokenizer
    media: MediaInputs
    media_pool: MediaPool | None
    max_model_len: int
    vocab_size: int
    grammar: GrammarBackend | None
    sampling_params: Callable[..., SamplingParams]
    think_end_id: int | None
    media_policy: MediaPolicy

    @classmethod
    def build(cls, llm: LLM, config: ServerConfig, runner: EngineRunner) -> ServingContext:
        engine = runner.engine
        policy = MediaPolicy(allow_paths=False, allowed_local_dir=config.allowed_local_media_path,
                             max_image_pixels=config.max_image_pixels, max_video_pixels=config.max_video_pixels,
                             clamp=True, limit_images=config.limit_images, limit_videos=config.limit_videos)
        tokenizer = llm.tokenizer
        return cls(config, runner, llm.chat_template, tokenizer, llm.media,
                   MediaPool(config.media_workers, config.media_queue), engine.max_model_len,
                   llm.config.text.vocab_size, engine.grammar, llm.default_sampling_params,
                   tokenizer.special_tokens.get("</think>"), policy)
