"""The engine: requests in, tokens and text out, every active request in one batched forward per step.

  config.py        EngineConfig: every setting, one name each
  core.py          Engine: the request lifecycle, prefix-cache snapshots, failure isolation, a step
  runner.py        ModelRunner: cache allocation, batch assembly, the forward (eager or CUDA graphs)
  output.py        a request's output: picks, logprobs, detokenized text, stop strings, finish reasons
  speculative.py   Speculator: MTP drafts, and an injectable drafter
  request.py       Request, StepOutput, EngineStats
  scheduler.py     who runs in the next step, with how many tokens (pure Python)
  prefix_cache.py  the hybrid prefix cache's index (pure Python)
  blocks.py        KV blocks counted by reference
  cuda_graphs.py   decode steps replayed as CUDA graphs
The model's input contract (batch.py, cache.py) stays outside: the model knows nothing of requests.
"""
from .config import EngineConfig
from .core import MAX_FORWARD_FAILURES, Engine
from .request import EngineStats, Request, StepOutput
from .speculative import Drafter

__all__ = ["Drafter", "Engine", "EngineConfig", "EngineStats", "MAX_FORWARD_FAILURES", "Request", "StepOutput"]
