"""The demo checkpoint (official layout, real vocabulary and tokenizer, random weights) that `qwen36 demo`,
`qwen36 make-demo` and `qwen36 bench --serve` use, and the small picture the demo's image turn shows."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .paths import cache_dir
from .synth import DEMO, REAL, write_checkpoint

DEMO_VERSION = 3  # bumped when the demo checkpoint's files change (v3: preprocessor configs)
DEMO_MARK = ".qwen36-demo"   # in every directory make-demo writes: the only kind it will replace


def make_demo(out: Path, seed: int = 0, geometry: str = "demo", layers: int | None = None,
              quantization: str | None = None, dtype: str | None = None, mtp: bool = True) -> Path:
    """Write a demo checkpoint (official layout, real vocabulary, random weights) atomically. The "real"
    geometry is Qwen3.6-35B-A3B's, written directly in quantized form (int4 unless told otherwise), or with
    dtype="bfloat16" as plain bf16 tensors one layer at a time (what llama.cpp's converter reads)."""
    out = Path(out)
    if out.exists() and not (out / DEMO_MARK).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and was not made by make-demo: give a new or empty directory "
                         "(make-demo replaces only a demo checkpoint it wrote itself)")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists() and not (tmp / DEMO_MARK).exists():
        raise ValueError(f"{tmp} exists and was not made by make-demo: move it away first")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / DEMO_MARK).write_text("written by qwen36 make-demo (random weights); make-demo may replace it\n")
    geo = dict(REAL if geometry == "real" else DEMO)
    if layers:
        geo["num_hidden_layers"] = layers
    if dtype is not None and quantization is not None:
        raise ValueError("give --dtype or --quantization, not both")
    if geometry == "real" and dtype is None:
        quantization = quantization or "int4"
    write_checkpoint(tmp, geo, seed=seed, tokenizer=True, quantization=quantization, mtp=mtp,
                     shards=2 if quantization is None else 1, streamed=dtype is not None, progress=sys.stderr.isatty(),
                     dtype={"bfloat16": torch.bfloat16, "float32": torch.float32, None: torch.bfloat16}[dtype])
    if out.exists():
        shutil.rmtree(out) if (out / DEMO_MARK).exists() else out.rmdir()    # ours, or empty
    tmp.rename(out)
    return out


def demo_checkpoint(seed: int = 0) -> Path:
    """The cached demo checkpoint, made on first use."""
    path = cache_dir() / f"demo-v{DEMO_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        print(f"making the demo checkpoint in {path} (once) ...", file=sys.stderr)
        make_demo(path, seed)
    return path


def demo_image():
    """A small synthetic picture for the demo: a sky-to-grass gradient with a sun."""
    img = Image.new("RGB", (96, 64))
    draw = ImageDraw.Draw(img)
    for y in range(64):
        draw.line([(0, y), (95, y)], fill=(90, 160, 230) if y < 40 else (70, 150, 60))
    draw.ellipse([66, 6, 86, 26], fill=(250, 210, 40))
    return img
