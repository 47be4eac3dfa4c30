"""`EngineConfig`: every setting of an engine, one name each (vLLM's where it has one).

The CLI (`qwen36 serve/chat/generate/bench`), `LLM(path, ...)`, `Engine(model, tokenizer, ...)` and the server
all build or read this one object; nothing else takes these settings under another name. Sizes are bytes here
(the CLI parses "4G"). A setting left None is resolved from the machine when the model loads (weights form,
KV-cache budget, max context: plan.py) and printed in the start-up banner. Compute switches (which kernels
run) live in `compute`; the environment only supplies their defaults (ops/backend.py).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields, replace

from ..config import ConfigError, merge_rope_scaling, parse_text_config
from ..ops.backend import ComputeConfig

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
SPECULATIVE_METHODS = ("mtp",)                    # the checkpoint's own multi-token-prediction head
MAX_SPECULATIVE_TOKENS = 8
GiB = 1 << 30

# names an earlier release took, and the setting each now is (accepted with a DeprecationWarning)
DEPRECATED_NAMES = {"kv_cache_bytes": "kv_cache_memory", "prefix_cache_bytes": "prefix_cache_memory",
                    "num_slots": "max_num_seqs", "token_budget": "max_num_batched_tokens"}


@dataclass(frozen=True)
class EngineConfig:
    # the weights (plan.py resolves "auto")
    dtype: str = "auto"                       # float32 / bfloat16 / float16; auto: float32 on a CPU, bf16 on a GPU
    device: str = "cpu"                       # cpu, cuda, cuda:N
    quantization: str | None = "auto"         # int4 / int8 / None (unquantized); auto: int4 on a CPU
    convert_cache: bool = True                # CPU: quantize once into the cache and map that copy later
    max_ram: int | None = None                # bytes of resident memory; routed experts beyond it read from disk
    cpu_experts: int | str | None = None      # with a GPU: routed experts of all / the last N layers on the CPU
    # caches and batching
    max_num_seqs: int = 8                     # sequences in one step (state slots)
    max_model_len: int | None = None          # tokens of prompt + output; None: what the KV budget holds
    max_num_batched_tokens: int = 512         # tokens per step (a quarter of it for prompts while others decode)
    kv_cache_memory: int | None = None        # bytes for KV blocks; None: sized from the memory left
    kv_cache_dtype: str = "auto"              # float32 / bfloat16 / int8 (per-token, per-head scales); auto: plan.py
    block_size: int = 64                      # KV rows per block
    enable_prefix_caching: bool = True        # reuse the state of earlier prompts' prefixes
    prefix_cache_memory: int | None = None    # bytes for prefix-cache state snapshots; None: 1 GiB or less
    snapshot_every: int = 4096                # prompt tokens between prefix-cache snapshots (besides messages)
    # positions: YaRN (or other rope scaling) merged into the checkpoint's rope parameters, e.g.
    # {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    rope_scaling: dict | str | None = None
    # decoding
    speculative_config: dict | str | None = None   # {"method": "mtp", "num_speculative_tokens": k}
    cuda_graphs: bool = False                 # replay plain decode steps as CUDA graphs (a GPU)
    compute: ComputeConfig = field(default_factory=ComputeConfig.from_env)   # which kernels run (ops/backend.py)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "snapshot_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        for name in ("kv_cache_memory", "prefix_cache_memory", "max_ram"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be a number of bytes >= 0, got {value}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        parse_speculative_config(self.speculative_config)      # said at construction, not at load
        if self.rope_scaling is not None:
            try:
                parse_text_config(merge_rope_scaling({}, self.rope_scaling))
            except ConfigError as e:
                raise ConfigError(f"rope_scaling: {str(e).removeprefix('config.json: ')}") from None

    @classmethod
    def build(cls, config: EngineConfig | None = None, **settings) -> EngineConfig:
        """`config` (or the defaults) with `settings` applied; earlier names are mapped to today's, with a
        DeprecationWarning, and an unknown name is a TypeError naming it."""
        known = {f.name for f in fields(cls)}
        for old, new in DEPRECATED_NAMES.items():
            if old in settings:
                if new in settings:
                    raise TypeError(f"give {new}= only ({old}= is its earlier name)")
                warnings.warn(f"{old}= is now {new}=", DeprecationWarning, stacklevel=3)
                settings[new] = settings.pop(old)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; EngineConfig has {sorted(known)}")
        return replace(config, **settings) if config is not None else cls(**settings)

    @property
    def num_speculative_tokens(self) -> int:
        return parse_speculative_config(self.speculative_config)[0]

    @property
    def draft_vocab_size(self) -> int | None:
        return parse_speculative_config(self.speculative_config)[1]


def parse_speculative_config(config) -> tuple[int, int | None]:
    """speculative_config -> (k, draft vocabulary size or None for the whole vocabulary). Besides vLLM's
    keys, "draft_vocab_size": N drafts among the first N token ids and the special tokens (mtp.DraftHead)."""
    if config is None:
        return 0, None
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("speculative_config must be an object such as "
                         '{"method": "mtp", "num_speculative_tokens": 2}')
    unknown = sorted(set(config) - {"method", "num_speculative_tokens", "draft_vocab_size"})
    if unknown:
        raise ValueError(f"speculative_config: unsupported field(s) {unknown}; "
                         "qwen36 takes 'method', 'num_speculative_tokens' and 'draft_vocab_size'")
    method = config.get("method", "mtp")
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative_config.method={method!r} is not supported; choose one of "
                         f"{list(SPECULATIVE_METHODS)} (the checkpoint's own multi-token-prediction head)")
    k = config.get("num_speculative_tokens", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative_config.num_speculative_tokens={k!r}: must be an integer in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}]")
    n = config.get("draft_vocab_size")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 256):
        raise ValueError(f"speculative_config.draft_vocab_size={n!r}: must be an integer >= 256")
    return k, n
