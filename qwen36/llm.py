"""`LLM`: the offline entry point (load a checkpoint, score, generate)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from .cache import HybridCache
from .chat import ChatTemplate
from .checkpoint import Checkpoint
from .config import load_config
from .export import cached_conversion
from .hub import resolve_model
from . import hugepages
from .plan import CachePlan, check_fits, memory_available, plan_caches, plan_kv, plan_weights, size
from .engine.cuda_graphs import obstacle as graph_obstacle
from .engine import Engine, EngineConfig, StepOutput
from .image import VisionPreprocess
from .inputs import MediaInputs, MediaPolicy, PromptInputs, render_chat_prompt
from .loader import load_model
from .multimodal import MultimodalPrompt
from .parsers import ChatResult, parse_assistant
from .residency import ExpertResidency
from .sampling import SamplingParams
from .structured import GrammarBackend
from .tokenizer import Tokenizer, TokenizerError
from .vision import load_vision_tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Completion:
    """One generated sequence. `text` is decoded on first use, so id-in/id-out generation works with
    checkpoints that ship no tokenizer files."""

    def __init__(self, token_ids: list[int], finish_reason: str, prompt_token_ids: list[int], decode,
                 text: str | None = None):
        self.token_ids = token_ids
        self.finish_reason = finish_reason              # "stop" | "length"
        self.prompt_token_ids = prompt_token_ids
        self._decode, self._text = decode, text

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._decode(self.token_ids)
        return self._text

    def __repr__(self) -> str:
        return f"Completion(token_ids={self.token_ids!r}, finish_reason={self.finish_reason!r})"


class LLM:
    def __init__(self, path: str | Path, config: EngineConfig | None = None, *, progress: bool = False,
                 **settings):
        """path: a checkpoint directory, or a Hugging Face repo id already in the local cache. config: every
        setting (EngineConfig); settings= override single ones by their names, e.g.
        `LLM(path, quantization=None, max_num_seqs=4)`. dtype "auto": float32 on a CPU, bfloat16 on a GPU.
        quantization "auto": int4 for a float or FP8 checkpoint on a CPU, as stored for one stored int8/int4,
        none on a GPU (plan.py); None: unquantized. The weights' size in that form is held against the
        machine's memory before anything is read (plan.InsufficientMemory names the options). convert_cache:
        on a CPU, quantize once into the cache (export.cached_conversion) and map that on later starts.
        kv_cache_memory / max_model_len / prefix_cache_memory None: sized from the memory left
        (plan.plan_caches). progress: bars on stderr."""
        config = EngineConfig.build(config, **settings)
        self.device = torch.device(config.device)
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, not device={config.device!r}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={config.device!r}: CUDA is not available on this machine")
            if self.device.index is None:      # "cuda" -> "cuda:N" of the current device, as tensors report it
                self.device = torch.device("cuda", torch.cuda.current_device())
        # speculative decoding: {"method": "mtp", "num_speculative_tokens": k} drafts k tokens per step with
        # the checkpoint's MTP head; the output is the same as without it (greedy tokens, sampled distribution)
        k = config.num_speculative_tokens
        self.path = resolve_model(path, progress)       # a local directory, or a repo id from the HF cache
        model_config, ckpt = load_config(self.path, config.rope_scaling), Checkpoint(self.path)
        self.plan = plan_weights(model_config, ckpt, str(self.device), config.dtype, config.quantization,
                                 mtp=k > 0, cpu_experts=config.cpu_experts)
        self.available = memory_available(str(self.device))       # before loading: the budget for everything
        check_fits(self.plan, str(self.device), self.available, config.max_ram, config.cpu_experts)
        source = self.path
        if (config.convert_cache and self.device.type == "cpu" and self.plan.quantization
                and self.plan.stored not in ("int8", "int4")):
            source = cached_conversion(self.path, self.plan.quantization, self.plan.bytes, progress,
                                       dtype=DTYPES[self.plan.dtype]) or self.path
        self.weights_source = source            # what was loaded: the checkpoint, or its converted copy
        self.config, self.model = load_model(source, DTYPES[self.plan.dtype], self.device,
                                             quantization=self.plan.quantization, mtp=k > 0,
                                             cpu_experts=config.cpu_experts or 0, compute=config.compute,
                                             rope_scaling=config.rope_scaling)
        if config.cuda_graphs and (why := graph_obstacle(self.model)) is not None:   # said now, not at a step
            raise ValueError(f"cuda_graphs=True: {why}")
        if self.device.type == "cpu":   # decode reads weights ~1.4x faster from huge pages (hugepages.py)
            hugepages.place_weights(self.model, experts=config.max_ram is None)
        # on the CPU the vision tower stays as stored (bf16: the memory map itself, no copy at start-up) and
        # upcasts one layer at a time as it runs; elsewhere it takes the model's dtype
        tower_dtype = None if self.device.type == "cpu" else DTYPES[self.plan.dtype]
        self.vision = load_vision_tower(self.model.checkpoint, self.config.vision, tower_dtype, self.device)
        self._media: MediaInputs | None = None
        self.generation_config = _read_optional_json(self.path / "generation_config.json")
        if config.max_ram is not None:  # experts beyond the limit leave memory, least recently used first
            self.residency = ExpertResidency(self.model, config.max_ram)
        self._tokenizer: Tokenizer | None = None
        # KV cache, context and prefix cache: as given, else from the memory left; the engine gets the result
        self.caches = self._plan_caches(config)
        self.engine_config = replace(config, max_model_len=self.caches.max_model_len,
                                     kv_cache_dtype=self.caches.kv_cache_dtype,
                                     kv_cache_memory=self.caches.kv_cache_memory,
                                     prefix_cache_memory=self.caches.prefix_cache_memory)
        self._engine: Engine | None = None
        self._chat_template: ChatTemplate | None = None

    def _plan_caches(self, config: EngineConfig) -> CachePlan:
        """KV cache dtype and sizes, context and prefix cache: as given, else from the memory left
        (plan.plan_kv, plan.plan_caches)."""
        k = config.num_speculative_tokens
        compute = {v: n for n, v in DTYPES.items()}[self.model.compute_dtype]
        metas = {name: HybridCache(self.model.cache_layout(mtp=k > 0, kv_dtype=name), 1, 1, 64,
                                   self.model.compute_dtype, "meta") for name in ("float32", "bfloat16", "int8")}
        per_token = {name: meta.bytes_per_block() // 64 for name, meta in metas.items()}
        states = metas["float32"].bytes_per_slot() * config.max_num_seqs * (1 + k)
        # with max_ram, experts leave memory as needed: the weights take at most that much
        weights = self.plan.bytes if config.max_ram is None else min(self.plan.bytes, config.max_ram)
        context = self.config.text.max_context

        def plan(dtype: str, kv_per_token: int) -> CachePlan:
            return plan_caches(self.available, weights, str(self.device), kv_per_token, states, context,
                               config.max_num_seqs, config.kv_cache_memory, config.max_model_len,
                               config.prefix_cache_memory, kv_cache_dtype=dtype)

        return plan_kv(config.kv_cache_dtype, str(self.device), compute, per_token, config.max_model_len or context,
                       plan, memory_given=config.kv_cache_memory is not None)

    def describe(self) -> str:
        """What was chosen for this machine (weights, KV cache, context), for the start-up banner."""
        c = self.caches
        return (f"{self.plan.describe()}\n  KV cache {size(c.kv_cache_memory)} {c.kv_cache_dtype} ({c.reason}): max "
                f"context {c.max_model_len} tokens, {self.engine_config.max_num_seqs} sequence(s) at once, one alone up "
                f"to {c.longest_context} tokens; prefix cache {size(c.prefix_cache_memory)}")

    @property
    def max_model_len(self) -> int:
        return self.caches.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """generation_config.json's eos_token_id, else <|im_end|> and <|endoftext|> if a tokenizer ships."""
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
        try:
            return self.tokenizer.eos_ids
        except TokenizerError:
            return ()

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (temperature, top_k, top_p)."""
        g = self.generation_config
        base = {}
        if g.get("do_sample") is False:
            base["temperature"] = 0.0
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if key in g and key not in base:
                base[key] = g[key]
        return SamplingParams(**{**base, **overrides})

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ValueError("the prompt has no tokens: give at least one")
        V = self.config.text.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        return ids

    @torch.inference_mode()
    def logits(self, token_ids, mm: MultimodalPrompt | None = None) -> torch.Tensor:
        """float32 [len(token_ids), vocab_size]: one full forward of one sequence, no cache reuse.
        mm: the image/video embeddings and positions of a multimodal prompt (see `encode_prompt`)."""
        ids = self._check_ids(token_ids)
        cache = self.model.new_cache(1, len(ids))
        x = self.model.embed(torch.tensor(ids, device=self.device))
        positions = None
        if mm is not None:
            mm.scatter_into(x, 0, len(ids), 0)
            positions = mm.positions_for(0, len(ids))
        return self.model(x, cache.batch([0], [0], [len(ids)], logits="all", positions=positions), cache)

    @torch.inference_mode()
    def warm_up(self, n: int = 128) -> None:
        """One forward of n tokens through a throwaway cache: the first real request then does not pay for
        first-touch allocations and kernel set-up (llama.cpp's server does the same at load)."""
        n = min(n, self.config.text.max_context)
        cache = self.model.new_cache(1, n)
        ids = torch.arange(n, device=self.device) % min(self.config.text.vocab_size, 1000)
        self.model(self.model.embed(ids), cache.batch([0], [0], [n]), cache)
        if self.engine().grammar is not None:           # the grammar engine's tables (structured output)
            self.engine().grammar.warm()

    def engine(self) -> Engine:
        """The continuous-batching engine behind generate/chat (made on first use)."""
        if self._engine is None:
            try:
                tokenizer = self.tokenizer
            except TokenizerError:
                tokenizer = None                               # id-in/id-out still works
            tokenizer_file = Path(self.path) / "tokenizer.json"
            grammar = (GrammarBackend(tokenizer_file, self.config.text.vocab_size, self.eos_token_ids)
                       if tokenizer is not None and tokenizer_file.is_file() else None)
            self._engine = Engine(self.model, tokenizer, self.engine_config, eos_token_ids=self.eos_token_ids,
                                  grammar=grammar)
        return self._engine

    @property
    def media(self) -> MediaInputs:
        """Images and videos -> prompt inputs (preprocessing as the checkpoint's preprocessor configs say)."""
        if self._media is None:
            pp = VisionPreprocess.from_checkpoint(self.path, self.config.vision)
            self._media = MediaInputs(self.config, self.vision, pp, self.tokenizer, self.device)
        return self._media

    def encode_chat(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = True,
                    preserve_thinking: bool = False, policy: MediaPolicy = MediaPolicy()) -> PromptInputs:
        """A conversation (content parts may hold images and videos) -> the generation prompt's inputs."""
        chat = render_chat_prompt(self.chat_template, self.tokenizer.escape, messages, tools,
                                  enable_thinking=enable_thinking, preserve_thinking=preserve_thinking)
        # media planned from their headers, then decoded; message text never becomes control tokens
        return self.media.prompt_inputs(chat.text, chat.messages, policy, None, escaped=True)

    def encode_prompt(self, prompt) -> PromptInputs:
        """str | list[int] | PromptInputs | {"prompt": str, "multi_modal_data": {"image": [...], "video": [...]}}
        (vLLM's form: the text holds one <|vision_start|><|image_pad|><|vision_end|> per image, and
        <|vision_start|><|video_pad|><|vision_end|> per video) -> PromptInputs."""
        if isinstance(prompt, PromptInputs):
            return PromptInputs(self._check_ids(prompt.ids), prompt.mm)
        if isinstance(prompt, dict):
            text = prompt.get("prompt")
            if not isinstance(text, str):
                raise ValueError("a prompt dict needs 'prompt': str")
            data = prompt.get("multi_modal_data") or {}
            unknown = set(data) - {"image", "video"}
            if unknown:
                raise ValueError(f"multi_modal_data: unknown key(s) {sorted(unknown)}; use 'image' and 'video'")
            parts = []
            for kind in ("image", "video"):
                items = data.get(kind, [])
                items = items if isinstance(items, list) and (kind == "image" or _is_video_list(items)) else [items]
                parts += [(f"multi_modal_data[{kind!r}][{k}]", kind, {kind: item}) for k, item in enumerate(items)]
            inputs = self.media.inputs_for(text, parts)
            return PromptInputs(self._check_ids(inputs.ids), inputs.mm)
        return PromptInputs(self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt))

    def generate(self, prompt, params: SamplingParams | None = None):
        """prompt: str | list[int] -> Completion; a list of those -> list[Completion], run as one batch."""
        params = params or self.default_sampling_params()
        single = isinstance(prompt, (str, dict, PromptInputs)) or (
            isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int))
        prompts = [prompt] if single else list(prompt)
        engine = self.engine()
        rids, ids = [], []
        inputs = [self.encode_prompt(p) for p in prompts]     # every prompt checked before any is queued
        try:
            for p in inputs:
                ids.append(p.ids)
                rids.append(engine.add_request(p.ids, params, mm=p.mm))
            results = {rid: ([], [], None) for rid in rids}
            while any(r[2] is None for r in results.values()):
                for out in engine.step():
                    toks, texts, _ = results[out.request_id]
                    toks.extend(out.token_ids)
                    texts.append(out.text)
                    if out.finished:
                        results[out.request_id] = (toks, texts, out.finish_reason)
        finally:
            for rid in rids:
                engine.abort(rid)                              # no-op for finished requests
        done = [Completion(results[r][0], results[r][2], i, lambda t: self.tokenizer.decode(t),
                           "".join(results[r][1]) if engine.tokenizer is not None else None)
                for r, i in zip(rids, ids)]
        return done[0] if single else done

    @property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's chat_template.jinja (or tokenizer_config.json template), else ours."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_checkpoint(self.path)
        return self._chat_template

    def chat(self, messages: list[dict], params: SamplingParams | None = None, tools: list | None = None,
             enable_thinking: bool = True, preserve_thinking: bool = False) -> ChatResult:
        """One assistant turn: render the conversation, generate, split reasoning / content / tool calls.
        User content parts may be images ({"type": "image", "image": path | PIL.Image | bytes | URL},
        {"type": "image_url", "image_url": {"url": "data:..." | "file://..."}}) and videos
        ({"type": "video", "video": path | list of frames}, {"type": "video_url", ...})."""
        inputs = self.encode_chat(messages, tools, enable_thinking, preserve_thinking)
        out = self.generate(inputs, params)
        result = parse_assistant(out.text, tools, thinking=enable_thinking)
        result.finish_reason = "tool_calls" if result.tool_calls and out.finish_reason == "stop" else out.finish_reason
        return result

    def generate_stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Yield StepOutputs (token ids, released text, finish) of one prompt as they are produced.
        Closing the iterator early (break, Ctrl-C) aborts the request and frees its cache at once."""
        params = params or self.default_sampling_params()
        engine = self.engine()
        inputs = self.encode_prompt(prompt)
        rid = engine.add_request(inputs.ids, params, mm=inputs.mm)
        try:
            while True:
                for out in engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            engine.abort(rid)


def _is_video_list(items: list) -> bool:
    """multi_modal_data["video"] as a list: several videos (each a path/URL or a list of frames), or else
    one video given as its frames (images)."""
    return all(isinstance(v, (str, list, tuple)) for v in items)


def _read_optional_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
