"""`qwen36 quantize MODEL OUT`: write a checkpoint that loads quantized without re-quantizing.

The output keeps the official layout (`model.language_model.*` names, sharded safetensors + index, the
same config.json plus `quantization_config`), with each quantized weight `W` stored as `W.q`, `W.scale`
and (int4) `W.min` (formats in ops/qformat.py). Vision tower and MTP tensors are copied through unchanged, as
are the tokenizer, generation config and chat template files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import Checkpoint, map_name
from .layers.quant import QuantExperts, QuantLinear
from .loader import load_model
from .plan import size

SIDE_FILES = ("generation_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json")
SHARD_BYTES = 4 << 30


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """Our names -> tensors of a loaded (quantized) model, quantized weights split into their parts."""
    out = dict(model.state_dict())                             # float tensors (quantized ones are not parameters)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            out.update({f"{name}.weight.{k}": v for k, v in module.parts().items()})
        elif isinstance(module, QuantExperts):
            for attr in ("gate_up_proj", "down_proj"):
                out.update({f"{name}.{attr}.{k}": v for k, v in module.parts(attr).items()})
    return out


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, group_size: int, progress: bool = False,
                        dtype: torch.dtype = torch.bfloat16) -> Path:
    """dtype: what float weights are read as before quantizing (LLM reads a float32 checkpoint as float32, so
    the copy it keeps in the cache equals quantizing at load)."""
    src, out = Path(src), Path(out)
    cfg, model = load_model(src, dtype, "cpu", quantization=method, group_size=group_size, progress=progress)
    raw = json.loads((src / "config.json").read_text())
    vl = raw.get("model_type") == "qwen3_5_moe"
    prefix = "model.language_model." if vl else "model."
    tensors = {(n if n.startswith("lm_head") else prefix + n): t.contiguous()
               for n, t in quantized_tensors(model).items()}
    ckpt = Checkpoint(src)
    for disk in ckpt.names():                    # vision tower, MTP: copied as they are (FP8 ones as bf16)
        if map_name(disk) == "":
            tensors[disk] = ckpt.read(disk, torch.bfloat16) if disk in ckpt.fp8 else ckpt.tensor(disk)   # mapped
    out.mkdir(parents=True, exist_ok=True)
    raw["quantization_config"] = model.quantization.to_json()
    del model
    write_shards(tensors, out, progress)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for f in SIDE_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out


def write_shards(tensors: dict[str, torch.Tensor], out: Path, progress: bool = False) -> None:
    """Safetensors shards of at most SHARD_BYTES plus the index, written a tensor at a time straight from
    its memory (safetensors' save_file copies a whole shard to bytes first: 4 GB more at the peak)."""
    groups, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    bar = _bar(progress, sum(t.numel() * t.element_size() for t in tensors.values()), "writing")
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for name in group:
            t = tensors[name]
            n = t.numel() * t.element_size()
            header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            at += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(out / file, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name in group:
                t = tensors[name].contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                bar.update(t.numel() * t.element_size())
        weight_map.update({name: file for name in group})
    bar.close()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
             torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64"}


def _bar(enabled: bool, total: int, what: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------ convert once, keep in the cache
FORMAT_VERSION = 1      # bump when the quantized format, or what a conversion writes, changes


def conversion_dir(src: Path, method: str, group_size: int, dtype: torch.dtype) -> Path:
    """Where the converted copy of `src` lives: keyed by the checkpoint's identity (config.json's bytes, each
    weight file's name, size and modification time, after following links) and our format version."""
    from .hub import model_name
    from .paths import cache_dir

    ident = hashlib.sha256(f"qwen36-convert v{FORMAT_VERSION} {method} g{group_size} {dtype}\n".encode())
    ident.update((src / "config.json").read_bytes())
    for f in sorted(src.glob("*.safetensors")):
        st = f.stat()
        ident.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    name = model_name(src, src.resolve())           # an HF cache snapshot: the repo's name, not the hash
    return cache_dir() / "converted" / f"{name}-{method}-{ident.hexdigest()[:16]}"


def cached_conversion(src: str | Path, method: str, estimate: int, progress: bool = False,
                      group_size: int = 128, dtype: torch.dtype = torch.bfloat16) -> Path | None:
    """The converted (quantized) copy of checkpoint `src`, written on first use (`quantize_checkpoint`) after a
    free-disk check; None when the disk is short (the caller quantizes at load, every start)."""
    src = Path(src)
    out = conversion_dir(src, method, group_size, dtype)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < estimate + (1 << 30):
        print(f"qwen36: not converting {src} to {method} in {out.parent}: {size(free)} free, it needs "
              f"~{size(estimate)}; quantizing at load instead (every start)", file=sys.stderr)
        return None
    print(f"qwen36: converting {src} to {method} once, into {out} (~{size(estimate)}); later starts map it",
          file=sys.stderr)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        quantize_checkpoint(src, tmp, method, group_size, progress, dtype)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():        # not another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
