"""`qwen36 quantize MODEL OUT`: write a checkpoint that loads quantized without re-quantizing.

The output keeps the official layout (`model.language_model.*` names, sharded safetensors + index, the
same config.json plus `quantization_config`), with each quantized weight `W` stored as `W.q`, `W.scale`
and (int4) `W.min` (formats in quant.py). Vision tower and MTP tensors are copied through unchanged, as
are the tokenizer, generation config and chat template files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import Checkpoint, map_name
from .model import load_model
from .quant import QuantExperts, QuantLinear
from .synth import write_safetensors

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


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, group_size: int) -> Path:
    src, out = Path(src), Path(out)
    cfg, model = load_model(src, torch.bfloat16, "cpu", quantization=method, group_size=group_size)
    raw = json.loads((src / "config.json").read_text())
    vl = raw.get("model_type") == "qwen3_5_moe"
    prefix = "model.language_model." if vl else "model."
    tensors = {(n if n.startswith("lm_head") else prefix + n): t.contiguous()
               for n, t in quantized_tensors(model).items()}
    ckpt = Checkpoint(src)
    for disk in ckpt.names():                                  # vision tower, MTP: copied as they are
        if map_name(disk) == "":
            tensors[disk] = ckpt.tensor(disk).clone()
    out.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_safetensors(tensors, out, max(1, -(-total // SHARD_BYTES)))
    raw["quantization_config"] = model.quantization.to_json()
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for f in SIDE_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out
