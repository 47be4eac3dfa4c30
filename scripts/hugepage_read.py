"""How fast the int4 output head (248,320 x 2048) is read from three kinds of memory: the checkpoint's file
mapping, ordinary anonymous memory, and huge-page memory (qwen36/hugepages.py). Caches are flushed (a 1 GiB
read) before each call; medians of 7.

  python scripts/hugepage_read.py [CHECKPOINT]     (default: the 4-layer synthetic int4 checkpoint of
                                                    `qwen36 bench --synthetic`, made if missing)
"""
from __future__ import annotations

import sys
import time

import torch

from qwen36 import hugepages
from qwen36.ops.backend import default_backend
from qwen36.ops.linear import qlinear
from qwen36.tools.checkpoints import synthetic_checkpoint
from qwen36.checkpoint import Checkpoint


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else synthetic_checkpoint(4, "int4")
    ckpt = Checkpoint(path)
    mapped = {k: ckpt.tensor(f"lm_head.weight.{k}") for k in ("q", "scale", "min")}
    plain = {k: v.clone() for k, v in mapped.items()}
    huge = {}
    for k, v in mapped.items():
        huge[k] = hugepages.empty(v.shape, v.dtype)
        huge[k].copy_(v)
    flush = hugepages.empty((1 << 28,), torch.float32)
    flush.fill_(1.0)
    x = torch.randn(1, mapped["q"].shape[1] * 2)
    backend = default_backend("cpu")
    gs = mapped["q"].shape[1] * 2 // mapped["scale"].shape[1]
    for name, w in (("file mapping (page cache)", mapped), ("anonymous, 4 KiB pages", plain),
                    ("anonymous, huge pages", huge)):
        times = []
        for _ in range(7):
            flush.sum()
            t = time.perf_counter()
            qlinear(x, w, backend)
            times.append(time.perf_counter() - t)
        ms = sorted(times)[3] * 1e3
        nbytes = sum(v.numel() * v.element_size() for v in w.values())
        print(f"{name:28s} {ms:6.2f} ms  {nbytes / ms / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
