"""The random checkpoints the benchmarks run on: the published Qwen3.6-35B-A3B widths with a chosen number of
layers and experts, written once (directly in quantized form if asked) into the cache and reused."""
from __future__ import annotations

from pathlib import Path

from ..paths import cache_dir
from ..synth import REAL, write_checkpoint


def synthetic_checkpoint(layers: int, quantization: str | None, experts: int = 256, mtp: bool = False) -> Path:
    """A cached random checkpoint at the real widths with `layers` layers and `experts` experts
    (written directly in quantized form if asked; with the MTP head if asked)."""
    tag = f"synthetic-real-L{layers}-E{experts}-{quantization or 'bf16'}" + ("-mtp" if mtp else "")
    path = cache_dir() / tag
    if not (path / "config.json").exists():
        geometry = {**REAL, "num_hidden_layers": layers, "num_experts": experts}
        write_checkpoint(path.with_name(tag + ".partial"), geometry, seed=0, quantization=quantization,
                         tokenizer=True, mtp=mtp, vision=None, shards=max(1, layers // 4))
        path.with_name(tag + ".partial").rename(path)
    return path
