"""Loading a model: build it on the meta device, fill it from the checkpoint one tensor at a time (quantizing
as it reads where asked), then prepare it for its device and resolve its compute backend once.

  load_model   the text decoder (and the MTP head, for speculative decoding) from a checkpoint
  load_mtp     the checkpoint's `mtp.*` head
  prepare      what a model needs once its weights are in place (rotary tables, compute dtype, backend)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import hugepages
from .checkpoint import Checkpoint, CheckpointError, disk_names_for, iter_text_weights
from .config import ModelConfig, load_config
from .layers.rotary import MRotary
from .model import TextModel
from .mtp import MTPHead, _fc_target
from .ops.backend import ComputeConfig, resolve_backend
from .ops.qformat import DEFAULT_GROUP, METHODS, QuantConfig, quantize, quantized_shapes
from .quant import load_target, offload_experts, quantize_modules

# fp32 on disk and tiny: kept in fp32 whatever the storage dtype (the decay and the gated norm)
KEEP_FP32 = ("linear_attn.A_log", "linear_attn.norm.weight")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
               compute_dtype: torch.dtype | None = None, quantization: str | None = None,
               group_size: int = DEFAULT_GROUP, mtp: bool = False,
               cpu_experts: int | str = 0, progress: bool = False,
               compute: ComputeConfig | None = None,
               rope_scaling: dict | str | None = None) -> tuple[ModelConfig, TextModel]:
    """Build the text model on the meta device and fill it from the checkpoint, one tensor at a time.

    quantization="int8"|"int4" quantizes each weight as it is read (the model never exists in fp32 as a
    whole); a checkpoint written by `qwen36 quantize` is loaded as it is stored, without re-quantizing.
    A block-FP8 checkpoint (Qwen's -FP8, config.fp8) is a source format: each weight is dequantized as it
    is read, into `dtype` or then into int8/int4.
    mtp=True also loads the MTP head (`model.mtp`, for speculative decoding). cpu_experts=N keeps the routed
    experts of the last N layers ("all": every layer) in CPU memory, int4, run by the CPU kernels
    (quant.offload_experts). compute: the compute paths asked for (None: ComputeConfig.from_env()); the
    model's backend (`model.backend`) is resolved from it once, here. rope_scaling: merged into the
    checkpoint's rope parameters (config.merge_rope_scaling; e.g. YaRN).
    """
    cfg = load_config(path, rope_scaling)
    ckpt = Checkpoint(path, fp8_block=cfg.fp8.block if cfg.fp8 else None)
    device = torch.device(device)
    qcfg = quant_config(cfg, quantization, group_size)
    with torch.device("meta"):
        model = TextModel(cfg.text)
    drop = ("lm_head.weight",) if cfg.text.tie_word_embeddings else ()
    n = cfg.text.num_hidden_layers
    cpu_experts = n if cpu_experts == "all" else cpu_experts
    if not isinstance(cpu_experts, int) or isinstance(cpu_experts, bool) or not 0 <= cpu_experts <= n:
        raise ValueError(f"cpu_experts={cpu_experts!r}: give 'all' or a number of layers from 0 to {n}")
    offload = (lambda m, q: offload_experts(m, range(n - cpu_experts, n), qcfg or QuantConfig("int4", group_size))) \
        if cpu_experts else None
    tensors, targets = read_weights(model, ckpt, cfg, qcfg, dtype, device, drop=drop, on_cpu=offload,
                                    progress=progress)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in targets:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    elif cfg.text.tie_word_embeddings:
        load_target(targets["lm_head.weight"], quantize(tensors["embed_tokens.weight"], qcfg))
    model.load_state_dict(tensors, strict=True, assign=True)
    model.quantization = qcfg
    model.checkpoint = ckpt             # other parts (the vision tower) are read from the same memory maps
    if mtp:
        model.mtp = load_mtp(cfg, ckpt, dtype, device, qcfg)
    prepare(model, device, dtype, compute_dtype, compute, cpu_kernels=device.type == "cpu" or cpu_experts > 0)
    return cfg, model


def prepare(model: TextModel, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype | None,
            compute: ComputeConfig | None = None, cpu_kernels: bool | None = None) -> None:
    """What a model needs once its weights are in place (loaded, or made on the device by device_bench):
    rotary tables, the compute dtype, and its backend, resolved from `compute` (None: from the environment)
    for `device` (cpu_kernels: load the native CPU kernels; default for a CPU model)."""
    device = torch.device(device)
    model.requires_grad_(False)
    model.rotary = MRotary(model.cfg, device)
    if compute_dtype is None:  # CPU: fp32 activations whatever the storage (bf16 matmul is ~500x slower)
        compute_dtype = torch.float32 if device.type == "cpu" else dtype
    model.compute_dtype = compute_dtype
    model.set_backend(resolve_backend(compute or ComputeConfig.from_env(), device, cpu_kernels))
    if device.type == "cpu":
        model.backend.prepare_thread()      # DeltaNet's decays underflow: denormals are ~100x slower


def load_mtp(cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device, qcfg) -> MTPHead:
    """The checkpoint's `mtp.*` head (per-expert or fused experts), quantized like the decoder."""
    if cfg.text.mtp_num_hidden_layers < 1 or not any(n.startswith("mtp.") for n in ckpt.names()):
        raise CheckpointError(f"{ckpt.path}: speculative decoding with method 'mtp' needs the checkpoint's "
                              "mtp.* weights (the multi-token-prediction head), and this checkpoint has none")
    if cfg.text.mtp_num_hidden_layers != 1:
        raise CheckpointError(f"{ckpt.path}: mtp_num_hidden_layers={cfg.text.mtp_num_hidden_layers}; "
                              "only the one-layer MTP head of Qwen3.5/3.6 is supported")
    with torch.device("meta"):
        head = MTPHead(cfg.text)
    tensors, _ = read_weights(head, ckpt, cfg, qcfg, dtype, device, part="mtp", extra_targets=_fc_target)
    head.load_state_dict(tensors, strict=True, assign=True)
    head.requires_grad_(False)
    return head


def read_weights(module: nn.Module, ckpt: Checkpoint, cfg: ModelConfig, qcfg: QuantConfig | None, dtype, device,
                 drop: tuple[str, ...] = (), part: str = "text",
                 extra_targets=None, on_cpu=None, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Fill `module` (built on the meta device) from the checkpoint, one tensor at a time: quantized weights
    go straight into their modules (quantized as read, or read as stored), the rest are returned by name.
    part: "text" (the decoder) or "mtp" (the `mtp.*` head). extra_targets(module, qcfg) may add weights to
    quantize that the naming rule (quant.is_quantized) does not cover; on_cpu(module, qcfg) likewise adds
    weights that are read, quantized and kept on the CPU whatever `device` is."""
    expected = {name: tuple(p.shape) for name, p in module.state_dict().items() if name not in drop}
    targets = quantize_modules(module, qcfg) if qcfg else {}
    if qcfg and extra_targets is not None:
        targets.update(extra_targets(module, qcfg))
    cpu_targets = on_cpu(module, qcfg) if on_cpu is not None else {}
    targets.update(cpu_targets)
    stored = {name for name in targets if cfg.quantization is not None and stored_as_parts(ckpt, name, part)}
    for name in stored:                                 # read the stored parts instead of float weights
        for suffix, shape in quantized_shapes(expected.pop(name), qcfg).items():
            expected[name + suffix] = shape
    tensors, parts = {}, {}
    weights = iter_text_weights(ckpt, expected, cfg.text.num_experts, dtype, device, keep_fp32=KEEP_FP32,
                                part=part, on_cpu=frozenset(cpu_targets))
    verb = "loading" if qcfg is None or stored else f"loading + quantizing to {qcfg.method}"
    for name, t in tqdm(weights, total=len(expected), desc=verb, unit=" tensors", disable=not progress,
                        file=sys.stderr, dynamic_ncols=True):
        base, dot, suffix = name.rpartition(".")
        if name in targets:                                    # a float weight to quantize now
            load_target(targets[name], quantize(t, targets[name][0].cfg))
            hugepages.release(t)                               # the float weight's file pages, if read in place
        elif base in stored:                                   # a stored part: load once all are read
            parts.setdefault(base, {})[suffix] = t
            if len(parts[base]) == len(quantized_shapes((1, qcfg.group_size * 2), qcfg)):
                load_target(targets[base], parts.pop(base))
        else:
            tensors[name] = t
    if qcfg is not None and torch.device(device).type == "cpu":
        # what stays float in a quantized model is small (router, gates, norms): keep it in fp32 so no
        # step casts it again; the embedding stays as stored (one row is read per token)
        tensors = {k: (v if k == "embed_tokens.weight" else v.float()) for k, v in tensors.items()}
    return tensors, targets


def stored_as_parts(ckpt: Checkpoint, name: str, part: str) -> bool:
    """Whether a quantized checkpoint holds `name` quantized (a `.q` part) rather than as a float weight
    (our export copies the `mtp.*` head as it was)."""
    return any(d + ".q" in ckpt.where for d in disk_names_for(name, part))


def quant_config(cfg: ModelConfig, quantization: str | None, group_size: int) -> QuantConfig | None:
    """The quantized form the model takes: the stored one of a `qwen36 quantize` checkpoint, else the one
    asked for (None: float). Block FP8 on disk (cfg.fp8) is not a stored form: it is read as float."""
    stored = QuantConfig.from_json(cfg.quantization) if cfg.quantization is not None else None
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"quantization={quantization!r} is not supported; choose one of {list(METHODS)} or None")
    if stored is not None:
        if quantization is not None and quantization != stored.method:
            raise ValueError(f"this checkpoint is stored quantized as {stored.method}; load it with "
                             f"quantization={stored.method!r} or None, not {quantization!r}")
        return stored
    return QuantConfig(quantization, group_size) if quantization else None
