"""The benchmark's workloads through peers, for side-by-side figures: HF transformers (fp32, the reference
implementation) and llama.cpp's llama-bench on a GGUF of the same model."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from ..reference import reference_classes
from .bench_context import llama_tool
from .measure import decode_rate, timed


class _Stamps:
    """A transformers streamer that notes when each new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.stamps, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def transformers_bench(path: Path, prompt: list[int], n: int) -> dict:
    """HF transformers in fp32 on the checkpoint: prefill time of `prompt` (after a warm-up on it) and the
    decode rate of n greedy tokens, timed from the first new token to the last."""
    hf = reference_classes()[1].from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(x, max_new_tokens=1, **kw)                                 # warm-up, same shapes
        _, prefill = timed(lambda: hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw))
        streamer = _Stamps()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **kw)
    return {"prefill_s": round(prefill, 3), "decode_tok_s": decode_rate(streamer.stamps)}


def llamacpp_bench(gguf: str, prompt_len: int, decode_tokens: int, threads: int) -> dict:
    """llama.cpp's llama-bench on a GGUF of the same model, same prompt and decode lengths and threads (the
    binary from $LLAMA_BENCH, else ~/.cache/llamacpp-anchor/build/bin/llama-bench; docs/performance.md says how
    to build it)."""
    cmd = [llama_tool("llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(prompt_len), "-n", str(decode_tokens), "-r", "2", "-o", "json"]
    runs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {"command": " ".join(cmd)}
    for r in runs:
        key = "prefill_tok_s" if r.get("n_prompt") else "decode_tok_s_batch1"
        out[key] = round(float(r["avg_ts"]), 2)
    return out
