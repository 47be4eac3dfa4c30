"""What to load and how much memory each part gets, decided once from the checkpoint and the machine.

With no options, `qwen36 serve DIR` (and `LLM(DIR)`) must fit the machine it runs on:
  * weights: on a CPU, a bf16/fp32/FP8 checkpoint runs int4 (~19.5 GB for Qwen3.6-35B-A3B against ~140 GB
    in fp32); a checkpoint stored int8/int4 runs as stored; on a GPU, bf16. Before anything is read, the
    weights' size in that form is estimated from the safetensors headers and held against the memory the
    machine has: if it does not fit, the error names the options instead of the kernel's OOM killer.
  * KV cache: what is left after the weights, the DeltaNet state slots and the prefix cache, less a margin
    (vLLM's gpu_memory_utilization in spirit), up to what `max_num_seqs` sequences of the full context need;
  * context: what that KV cache holds, up to the model's native 262,144 positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = ("auto", *FLOAT_BYTES)
QUANTIZATIONS = ("auto", None, "int8", "int4")
MIN_KV_TOKENS = 4096              # below this the machine is too small to be useful: say so at start


class InsufficientMemory(ValueError):
    """The chosen form of the model does not fit this machine (the message names the options)."""


@dataclass(frozen=True)
class WeightsPlan:
    dtype: str                    # float weights (and compute on a GPU): "float32" | "bfloat16" | "float16"
    quantization: str | None      # None | "int8" | "int4"
    stored: str                   # the checkpoint's form: "bfloat16", "float32", "float16", "fp8", "int8", "int4"
    bytes: int                    # estimated memory of the loaded weights
    reason: str                   # why this form (printed at start)

    def describe(self) -> str:
        form = self.quantization or self.dtype
        return f"weights {form} (~{size(self.bytes)}; checkpoint {self.stored}): {self.reason}"


def size(n: int) -> str:
    """Bytes for people: '19.4 GB', '312 MB'."""
    return f"{n / GiB:.1f} GB" if n >= GiB // 10 else f"{n / 2**20:.0f} MB"


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


def stored_form(cfg, ckpt) -> str:
    """The form the checkpoint's decoder weights are stored in."""
    q = cfg.quantization
    if isinstance(q, dict) and q.get("quant_method") == "qwen36":
        return "int8" if q.get("bits") == 8 else "int4"
    if cfg.fp8 is not None:
        return "fp8"
    names = [n for n in ckpt.names() if n.endswith("mlp.experts.gate_up_proj") or ".experts.0." in n]
    dt = ckpt.dtype_str(names[0]) if names else "BF16"
    return {"F32": "float32", "F16": "float16", "F8_E4M3": "fp8"}.get(dt, "bfloat16")


def plan_weights(cfg, ckpt, device: str = "cpu", dtype: str = "auto", quantization: str | None = "auto",
                 mtp: bool = False, group_size: int = 128, cpu_experts=None) -> WeightsPlan:
    """Resolve dtype="auto" and quantization="auto" for this checkpoint on this device. cpu_experts (experts
    offloaded to the CPU in int4, --cpu-experts): the rest of the model stays float."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; choose one of {list(QUANTIZATIONS)}")
    cpu = str(device).startswith("cpu")
    stored = stored_form(cfg, ckpt)
    auto_dtype = dtype == "auto"
    if auto_dtype:
        dtype = "float32" if cpu else "bfloat16"
    reason = "as asked"
    if quantization == "auto":
        if stored in ("int8", "int4"):
            quantization, reason = stored, "stored quantized: loaded as stored"
        elif cpu_experts:
            quantization, reason = None, "--cpu-experts: routed experts int4 in CPU memory, the rest float"
        elif cpu:
            quantization, reason = "int4", ("the CPU default (--quantization none for exact float32, int8 for "
                                            "closer to float at twice the memory)")
        else:
            quantization, reason = None, "the GPU default (--cpu-experts keeps routed experts in CPU memory)"
    elif stored in ("int8", "int4") and quantization is None:
        quantization, reason = stored, "stored quantized: loaded as stored"
    if cpu and quantization and auto_dtype and stored in ("bfloat16", "int8", "int4"):
        # quantized on a CPU, every float weight but the embedding is upcast to fp32 at load; read as bf16
        # (exact for bf16 values), the embedding stays bf16: 1 GB less at the real geometry, the same rows
        dtype = "bfloat16"
    float_bytes = 4 if cpu and quantization else FLOAT_BYTES[dtype]
    return WeightsPlan(dtype, quantization, stored, weight_bytes(cfg, ckpt, quantization, float_bytes, group_size,
                                                                 mtp, FLOAT_BYTES[dtype]), reason)


def weight_bytes(cfg, ckpt, quantization: str | None, float_bytes: int, group_size: int = 128,
                 mtp: bool = False, embed_bytes: int | None = None) -> int:
    """Memory of the loaded weights, without reading any: the decoder (and MTP head) built on the meta device
    and passed through the same quantization pass the loader uses, so each weight is counted in the form it
    will have (quantized parts, small weights at float_bytes, the embedding at embed_bytes, default
    float_bytes); the vision tower as stored (it is used in place)."""
    import torch

    from .checkpoint import map_name
    from .model import TextModel
    from .mtp import MTPHead, _fc_target
    from .ops.qformat import QuantConfig, quantized_shapes
    from .quant import quantize_modules

    stored_q = isinstance(cfg.quantization, dict) and cfg.quantization.get("quant_method") == "qwen36"
    qcfg = QuantConfig.from_json(cfg.quantization) if stored_q else \
        QuantConfig(quantization, group_size) if quantization else None
    part_bytes = {".q": 1, ".scale": 4, ".min": 4}
    total = sum(math.prod(ckpt.shape(n)) * _itemsize(ckpt.dtype_str(n))     # the vision tower
                for n in ckpt.names() if not n.startswith("mtp.") and map_name(n) == "")
    with torch.device("meta"):
        heads = [(TextModel(cfg.text), None)] + ([(MTPHead(cfg.text), _fc_target)] if mtp else [])
    for module, extra in heads:
        shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        targets = {}
        if qcfg is not None:
            targets = quantize_modules(module, qcfg)
            targets.update(extra(module, qcfg) if extra else {})
        for name, shape in shapes.items():
            if name in targets:
                total += sum(math.prod(s) * part_bytes[k] for k, s in quantized_shapes(shape, qcfg).items())
            elif name == "embed_tokens.weight":
                total += math.prod(shape) * (embed_bytes or float_bytes)
            else:
                total += math.prod(shape) * float_bytes
    return total


def _itemsize(dtype_str: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}.get(dtype_str, 1)


def memory_available(device: str = "cpu") -> int | None:
    """Bytes this process can still use: MemAvailable, under a cgroup (container) limit if one is set; on a
    GPU, its free memory."""
    if not str(device).startswith("cpu"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    from .hugepages import available_bytes

    avail = available_bytes()
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def margin(device: str = "cpu") -> int:
    """Memory left unplanned for activations, the allocator and the rest of the process (5%, >= 1 GiB)."""
    if str(device).startswith("cpu"):
        from .hugepages import meminfo
        total = meminfo("MemTotal") or 16 * GiB
    else:
        import torch
        total = torch.cuda.mem_get_info(torch.device(device))[1]
    return max(GiB, total // 20)


def check_fits(plan: WeightsPlan, device: str, available: int | None, max_ram: int | None = None,
               cpu_experts=None) -> None:
    """Raise InsufficientMemory, naming the options, when the weights cannot fit; nothing when unknown, or when
    the user already chose to page experts (max_ram) or offload them (cpu_experts)."""
    if available is None or max_ram is not None or cpu_experts:
        return
    need = plan.bytes + margin(device)
    if need <= available:
        return
    gb = lambda n: f"{n / GiB:.1f} GB"                                          # noqa: E731
    form = plan.quantization or plan.dtype
    if str(device).startswith("cpu"):
        options = [f"--max-ram {max(1, int(available * 0.8) // GiB)}G: keep resident memory under that by "
                   "reading routed experts from disk as they are needed (slower; quantized weights on disk, "
                   "which the first start writes to the cache)"]
        if plan.quantization != "int4":
            options.insert(0, "--quantization int4 (the CPU default): about a quarter of bfloat16's size")
    else:
        options = ["--cpu-experts all (or N layers): routed experts in CPU memory, run by the CPU",
                   "a GPU with more memory, or several"]
    raise InsufficientMemory(
        f"the model needs ~{gb(plan.bytes)} as {form} (+{gb(margin(device))} working margin) and this machine "
        f"has {gb(available)} available on {device}. Options:\n  " + "\n  ".join(options))


@dataclass(frozen=True)
class CachePlan:
    kv_cache_memory: int
    max_model_len: int
    prefix_cache_memory: int
    reason: str
    kv_cache_dtype: str = "float32"
    kv_per_token: int = 0              # bytes of KV per token, all attention layers (scales included)

    @property
    def longest_context(self) -> int:
        """The most tokens one sequence can reach in this KV cache (alone in it), up to max_model_len."""
        fits = self.kv_cache_memory // self.kv_per_token if self.kv_per_token else self.max_model_len
        return min(fits, self.max_model_len)


def plan_kv(asked: str, device: str, compute_dtype: str, per_token: dict[str, int], target: int, plan,
            memory_given: bool = False) -> CachePlan:
    """The KV cache's dtype and sizes. asked: EngineConfig.kv_cache_dtype; per_token: bytes per token of each
    storage; plan(dtype, per_token) -> CachePlan (plan_caches with the rest fixed). "auto": on a GPU the
    compute dtype (as vLLM); on a CPU, with the KV memory left to the plan, the first of float32 (exact), bfloat16, int8 whose cache holds `target`
    tokens (the model's whole context, or --max-model-len) for one sequence in the memory left, else int8,
    which holds the most. memory_given (--kv-cache-memory set): "auto" is the compute dtype, the sizes as given."""
    if asked != "auto":
        return plan(asked, per_token[asked])
    if memory_given or not str(device).startswith("cpu"):
        name = compute_dtype if compute_dtype in per_token else "bfloat16"
        return plan(name, per_token[name])
    last = None
    for name in ("float32", "bfloat16", "int8"):
        try:
            last = plan(name, per_token[name])
        except InsufficientMemory:
            continue
        if last.longest_context >= target:
            return last
    return last if last is not None else plan("int8", per_token["int8"])


def plan_caches(available: int | None, weights: int, device: str, kv_per_token: int, state_bytes: int,
                native_len: int, max_num_seqs: int, kv_cache_memory: int | None = None,
                max_model_len: int | None = None, prefix_cache_memory: int | None = None,
                block_size: int = 64, kv_cache_dtype: str = "float32") -> CachePlan:
    """Size the KV cache (None: what is left after weights, DeltaNet states (state_bytes for all slots), the
    prefix cache and a margin) and the context (None: what that KV cache holds, up to native_len).
    prefix_cache_memory None: 1 GiB, or a quarter of what is left if that is less."""
    if max_model_len is not None and max_model_len < 1 or kv_cache_memory is not None and kv_cache_memory < 0:
        raise ValueError(f"max_model_len={max_model_len}, kv_cache_memory={kv_cache_memory}: give positive sizes")
    if max_model_len is not None and max_model_len > native_len:
        raise ValueError(f"--max-model-len {max_model_len} is past the {native_len:,} positions this model's rope "
                         f"parameters cover; --yarn FACTOR (or --rope-scaling) stretches them FACTOR times (YaRN, "
                         "as the model card describes for contexts past 262,144)")
    left = None if available is None else available - weights - state_bytes - margin(device)
    if prefix_cache_memory is None:
        prefix_cache_memory = GiB if left is None else max(0, min(GiB, left // 4))
    why, auto = "as asked", kv_cache_memory is None
    if auto:
        blocks = -(-(max_model_len or native_len) // block_size)                   # whole blocks of one context
        want = max_num_seqs * blocks * block_size * kv_per_token                  # more is never used
        if left is None:
            kv_cache_memory, why = min(want, GiB), "1 GiB: free memory unknown"
        else:
            kv_cache_memory, why = max(0, min(want, left - prefix_cache_memory)), "what is left after the weights"
    fits = kv_cache_memory // kv_per_token // block_size * block_size if kv_per_token else native_len
    if max_model_len is not None and max_model_len > fits:
        raise InsufficientMemory(
            f"--max-model-len {max_model_len} needs a KV cache of {max_model_len * kv_per_token / GiB:.2f} GB for one "
            f"sequence; the KV cache has {kv_cache_memory / GiB:.2f} GB ({fits} tokens). Raise --kv-cache-memory, "
            "lower --max-model-len, or leave both out to size them from the memory left")
    if max_model_len is None:
        max_model_len = min(native_len, fits)
        if auto and max_model_len < min(MIN_KV_TOKENS, native_len):
            raise InsufficientMemory(
                f"after the weights (~{size(weights)}) only {size(max(left or 0, 0))} is left: the "
                f"KV cache would hold {fits} tokens. Free memory, use a smaller weight form, or set "
                "--kv-cache-memory and --max-model-len yourself")
    return CachePlan(kv_cache_memory, min(max_model_len, native_len), prefix_cache_memory, why, kv_cache_dtype,
                     kv_per_token)
