"""Reading checkpoints in the official Hugging Face layout.

* `SafetensorsFile`: one .safetensors file, memory-mapped; tensors are zero-copy views of the page cache,
  so loading a weight costs one copy (into its final dtype and device), never two.
* `Checkpoint`: a directory; walks `model.safetensors.index.json` or a single `model.safetensors`. Block-FP8
  weights (Qwen's official `-FP8` checkpoints: `W` float8_e4m3fn + `W_scale_inv`) read as the float weights they
  stand for, dequantized one tensor at a time (`dequantize_fp8`); their scales are not listed as tensors.
* `NAME_MAP` and `map_name`: the ONE table from on-disk names to our parameter names. Every exception
  to "keep the checkpoint's name" lives there.
* `iter_text_weights`: every expected tensor present with its shape, nothing unexpected; errors name
  the file and the tensor.
"""
from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype strings -> torch dtypes we can read
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_INV = "_scale_inv"            # an FP8 weight `X.weight`'s block scales are `X.weight_scale_inv`


MAPPINGS: list[mmap.mmap] = []      # every file mapping opened (residency.py drops pages of these)


class CheckpointError(ValueError):
    """The checkpoint on disk is incomplete, corrupt, or does not match config.json."""


class SafetensorsFile:
    """One safetensors file: 8-byte little-endian header length, JSON header, raw data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}") from None
            if end < begin or self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt file: tensor {name!r} needs bytes up to "
                    f"{self.data_start + end}, the file has {size}")
            self.entries[name] = (dtype, shape, begin, end)
        self._mm = None

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype_str(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor's bytes (copy-on-write mapping: writing never reaches the file)."""
        dtype_s, shape, begin, end = self.entries[name]
        if dtype_s not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unsupported dtype {dtype_s}; readable: {sorted(DTYPES)}")
        dtype = DTYPES[dtype_s]
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (end - begin) != count * itemsize:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} of {dtype_s} "
                f"needs {count * itemsize}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            MAPPINGS.append(self._mm)
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self.data_start + begin).view(shape)


class Checkpoint:
    """A checkpoint directory: which file holds each tensor, opened lazily."""

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = None):
        """fp8_block: the [rows, cols] block of FP8 weights' scales (config.json's
        quantization_config.weight_block_size); None: read it from config.json when the checkpoint has FP8
        weights."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        self.where: dict[str, str] = {}
        self._files: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                some = [n for n, f in weight_map.items() if f == missing[0]][:3]
                raise CheckpointError(
                    f"{self.path}: missing shard file(s) {missing} named in {INDEX_FILE} "
                    f"(it should hold e.g. {some})")
            for name, file in weight_map.items():
                self.where[name] = file
                if name not in self._open(file).entries:
                    raise CheckpointError(
                        f"{self.path / file}: {INDEX_FILE} says tensor {name!r} is in this file, but it is not")
        elif single.exists():
            for name in self._open(SINGLE_FILE).names():
                self.where[name] = SINGLE_FILE
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.stored = dict(self.where)            # every tensor on disk, scales included
        self.fp8: dict[str, str] = {}             # FP8 weight -> its scale tensor (not in `where`)
        self.fp8_block = fp8_block
        self._pair_fp8()

    def _pair_fp8(self) -> None:
        """Find the FP8 weights and their `_scale_inv` scales (headers only: nothing is read) and check
        each scale grid against its weight: [..., ceil(N / block_rows), ceil(K / block_cols)]."""
        for name, file in self.stored.items():
            scale = name + SCALE_INV
            if scale not in self.stored or self._open(file).dtype_str(name) not in FP8_DTYPES:
                continue
            sd = self._open(self.stored[scale]).dtype_str(scale)
            if sd not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.path / self.stored[scale]}: tensor {scale!r} has dtype {sd}; "
                                      f"FP8 block scales must be one of {list(FLOAT_DTYPES)}")
            self.fp8[name] = scale
        if not self.fp8:
            return
        if self.fp8_block is None:
            self.fp8_block = _block_from_config(self.path)
        for name, scale in self.fp8.items():
            w, s = self.shape(name), self._open(self.stored[scale]).shape(scale)
            want = fp8_scale_shape(w, self.fp8_block) if self.fp8_block and len(w) >= 2 else None
            if want is None and len(w) >= 2 and len(s) == len(w) and all(
                    a % b == 0 for a, b in zip(w[-2:], s[-2:])) and s[-1] and s[-2]:
                want = tuple(s)                    # no block size given: the blocks tile the weight exactly
            if tuple(s) != want:
                raise CheckpointError(
                    f"{self.path / self.stored[scale]}: FP8 scale {scale!r} has shape {list(s)}, but weight "
                    f"{name!r} of shape {list(w)} in blocks of {list(self.fp8_block or ['?', '?'])} needs "
                    f"{list(want) if want else 'a [..., rows/block, cols/block] grid'}")
            del self.where[scale]

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.path / file)
        return self._files[file]

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> Path:
        return self.path / self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self.where[name]).shape(name)

    def dtype_str(self, name: str) -> str:
        """The dtype as stored (an FP8 weight's is F8_E4M3: `tensor` and `read` give it dequantized)."""
        return self._open(self.stored[name]).dtype_str(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of its file, or, for an FP8 weight, its dequantized fp32 values."""
        if name in self.fp8:
            return self.read(name, torch.float32, "cpu")
        return self._open(self.where[name]).tensor(name)

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor in `dtype` on `device`: on the CPU a tensor already in `dtype` is the memory-mapped view
        itself; on a GPU it crosses as stored and is converted there. An FP8 weight is dequantized (on that
        device) straight into `dtype`, a block row at a time: w = fp8 * scale_inv of its block."""
        device = torch.device(device)
        if name in self.fp8:
            w, s = self._open(self.where[name]).tensor(name), self._open(self.stored[self.fp8[name]]).tensor(self.fp8[name])
            if device.type != "cpu":
                w, s = w.to(device), s.to(device)
            return dequantize_fp8(w, s, self.fp8_block, dtype)
        t = self._open(self.where[name]).tensor(name)
        return t.to(device=device, dtype=dtype) if device.type == "cpu" else t.to(device).to(dtype)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a block-FP8 weight of `shape` [..., N, K]: [..., ceil(N / bn), ceil(K / bk)]."""
    *lead, N, K = shape
    return (*lead, -(-N // block[0]), -(-K // block[1]))


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-FP8 -> float: element (n, k) is w[n, k] * scale_inv[n // bn, k // bk], the product taken in fp32
    (as transformers' Fp8Dequantize and vLLM compute it) and rounded once into `dtype`. Edge blocks may be
    partial (the scale grid is ceil-sized). Leading axes (stacked experts) broadcast. Only one block row is
    ever held in fp32 besides the result."""
    *lead, N, K = w.shape
    if block is None:                                  # the blocks tile the weight exactly
        block = (N // scale_inv.shape[-2], K // scale_inv.shape[-1])
    bn, bk = block
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    cols = scale_inv.float().repeat_interleave(bk, dim=-1)[..., :K]            # [..., N/bn, K]: one row per block row
    for i in range(scale_inv.shape[-2]):
        rows = slice(i * bn, min(N, (i + 1) * bn))
        out[..., rows, :] = w[..., rows, :].float() * cols[..., i:i + 1, :]
    return out


def _block_from_config(path: Path) -> tuple[int, int] | None:
    """quantization_config.weight_block_size of the checkpoint's config.json, if it says one."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        block = raw["quantization_config"]["weight_block_size"]
        return int(block[0]), int(block[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------
# The one name-mapping table. Our text-model parameters keep the checkpoint's names minus the prefix.
# --------------------------------------------------------------------------------------------------
NAME_MAP = (
    # (on-disk pattern, our name template); tried in order, first match wins
    (re.compile(r"^model\.language_model\.(.+)$"), r"\1"),      # VL wrapper (official layout)
    (re.compile(r"^(lm_head\..+)$"), r"\1"),                     # untied output head (+ quantized parts)
    (re.compile(r"^model\.(?!visual\.|language_model\.)(.+)$"), r"\1"),  # text-only checkpoints
)
# Recognised but owned by other parts of the model (vision tower, MTP head): not text weights.
OTHER_PARTS = (re.compile(r"^model\.visual\."), re.compile(r"^mtp\."))
# Per-expert layout: layers.L.mlp.experts.E.{gate,up,down}_proj.weight -> fused gate_up_proj / down_proj.
PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def map_name(disk_name: str, part: str = "text") -> str | None:
    """Our parameter name for an on-disk tensor of `part` ("text": the decoder, "mtp": the `mtp.*` head,
    whose parameters are named without the prefix), '' for tensors of other parts, None if unknown."""
    if part == "mtp":
        return disk_name[len("mtp."):] if disk_name.startswith("mtp.") else ""
    if any(p.match(disk_name) for p in OTHER_PARTS):
        return ""
    for pattern, template in NAME_MAP:
        if pattern.match(disk_name):
            return pattern.sub(template, disk_name)
    return None


@dataclass
class _Expert:
    disk_name: str
    expert: int
    proj: str


def iter_text_weights(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], num_experts: int,
                      dtype: torch.dtype, device: torch.device | str,
                      keep_fp32: tuple[str, ...] = (), part: str = "text",
                      on_cpu: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) for every tensor of `expected` (our name -> shape), one at a time.

    Everything is checked first (unexpected, missing, shapes, dtypes: errors name file and tensor), so
    nothing heavy happens for a checkpoint that cannot load. Each tensor is then converted to `dtype` on
    `device` from its memory-mapped view (a tensor already in that dtype on the CPU is the view itself:
    its pages stay file-backed), so the caller can consume it (e.g. quantize it) before the next one
    exists. Names ending in `keep_fp32` stay fp32 if they are on disk; the integer part `.q` of a
    quantized weight keeps its dtype. Per-expert tensors are assembled into fused [E, 2I, H] / [E, H, I].
    part="mtp" reads the `mtp.*` head instead of the decoder (see map_name). Names in `on_cpu` (or whose
    quantized parts they are) go to the CPU whatever `device` is (experts offloaded with --cpu-experts).
    On a GPU, each tensor crosses as stored and is converted there (no converted copy in host memory).
    """
    found: dict[str, str] = {}                      # our name -> disk name
    experts: dict[str, list[_Expert]] = {}          # "layers.L.mlp.experts" -> pieces
    unexpected: list[str] = []
    for disk in ckpt.names():
        ours = map_name(disk, part)
        if ours == "":
            continue
        m = PER_EXPERT.match(ours) if ours else None
        if m:
            experts.setdefault(m.group(1), []).append(_Expert(disk, int(m.group(2)), m.group(3)))
        elif ours is not None and ours in expected:
            if ours in found:
                raise CheckpointError(f"{ckpt.path}: tensor {ours!r} appears twice: {found[ours]!r} and {disk!r}")
            found[ours] = disk
        else:
            unexpected.append(disk)
    if unexpected:
        shown = ", ".join(f"{n!r} (in {ckpt.where[n]})" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) not used by this model: {shown}{more}")

    def check_dtype(disk: str, ours: str) -> None:
        ds = ckpt.dtype_str(disk)
        ok = ("U8", "I8") if ours.endswith(".q") else FLOAT_DTYPES
        if ds not in ok and disk not in ckpt.fp8:         # an FP8 weight with its scales reads as float
            hint = ""
            if ds in FP8_DTYPES:
                hint = (f" (an FP8 weight needs its block scales {disk + SCALE_INV!r}, as Qwen's -FP8 checkpoints "
                        "ship them; qwen36 reads bf16 and block-FP8 checkpoints and quantizes them itself with "
                        "quantization='int8'|'int4')")
            elif not ours.endswith(".q"):
                hint = (" (qwen36 reads bf16 and block-FP8 checkpoints and quantizes them itself with "
                        "quantization='int8'|'int4')")
            raise CheckpointError(
                f"{ckpt.file_of(disk)}: tensor {disk!r} has unsupported dtype {ds}; expected one of {list(ok)}{hint}")

    assembled: dict[str, tuple[str, dict]] = {}     # fused name -> (which proj, {(e, proj): disk})
    for prefix, pieces in experts.items():
        gu, dn = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
        if gu not in expected:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor(s): {pieces[0].disk_name!r} (in {ckpt.where[pieces[0].disk_name]})")
        if gu in found or dn in found:
            raise CheckpointError(f"{ckpt.path}: {prefix} has both fused and per-expert tensors (e.g. {pieces[0].disk_name!r})")
        by_key = {(p.expert, p.proj): p.disk_name for p in pieces}
        E, two_i, H = expected[gu]
        I = two_i // 2
        want = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        for e in range(num_experts):
            for proj, shape in want.items():
                if (e, proj) not in by_key:
                    disk = re.sub(r"experts\.\d+\.\w+_proj", f"experts.{e}.{proj}", pieces[0].disk_name)
                    raise CheckpointError(f"{ckpt.path}: missing tensor {disk!r} (per-expert layout)")
                _check_shape(ckpt, by_key[(e, proj)], shape)
                check_dtype(by_key[(e, proj)], gu)
        extra = [p.disk_name for p in pieces if p.expert >= num_experts]
        if extra:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {extra[0]!r}: the config has {num_experts} experts")
        assembled[gu], assembled[dn] = ("gate_up", by_key), ("down", by_key)

    for ours, shape in expected.items():
        if ours in assembled:
            continue
        if ours not in found:
            raise CheckpointError(f"{ckpt.path}: missing tensor {_disk_name_for(ckpt, ours, part)!r}")
        _check_shape(ckpt, found[ours], shape)
        check_dtype(found[ours], ours)

    def target(ours: str) -> torch.device:
        return cpu if ours in on_cpu or ours.rpartition(".")[0] in on_cpu else device

    def convert(disk: str, t_dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        # already in the wanted dtype on the CPU: the memory-mapped view itself (no second copy in RAM);
        # an FP8 weight: dequantized into t_dtype as it is read
        return ckpt.read(disk, t_dtype, dev)

    device, cpu = torch.device(device), torch.device("cpu")
    for ours, shape in expected.items():
        dev = target(ours)
        if ours in assembled:
            kind, by_key = assembled[ours]
            fused = torch.empty(shape, dtype=dtype, device=dev)
            I = shape[1] // 2 if kind == "gate_up" else shape[2]
            for e in range(num_experts):
                if kind == "gate_up":
                    fused[e, :I] = convert(by_key[(e, "gate_proj")], dtype, dev)
                    fused[e, I:] = convert(by_key[(e, "up_proj")], dtype, dev)
                else:
                    fused[e] = convert(by_key[(e, "down_proj")], dtype, dev)
            yield ours, fused
            continue
        disk = found[ours]
        if ours.endswith(".q"):
            yield ours, ckpt.tensor(disk).to(device=dev)
            continue
        keep = ckpt.dtype_str(disk) == "F32" and ours.endswith(keep_fp32 + (".scale", ".min"))
        yield ours, convert(disk, torch.float32 if keep else dtype, dev)


def _check_shape(ckpt: Checkpoint, disk: str, shape: tuple[int, ...]) -> None:
    got = ckpt.shape(disk)
    if tuple(got) != tuple(shape):
        raise CheckpointError(
            f"{ckpt.file_of(disk)}: tensor {disk!r} has shape {list(got)}, config.json implies {list(shape)}")


def _disk_name_for(ckpt: Checkpoint, ours: str, part: str = "text") -> str:
    """The on-disk name we looked for, in the prefix style this checkpoint uses."""
    if ours == "lm_head.weight" or part == "mtp":
        return disk_names_for(ours, part)[0]
    vl = any(n.startswith("model.language_model.") for n in ckpt.names()) or not any(
        n.startswith("model.") for n in ckpt.names())
    return ("model.language_model." if vl else "model.") + ours


def disk_names_for(ours: str, part: str = "text") -> tuple[str, ...]:
    """The on-disk names our parameter `ours` of `part` may have (one per prefix style)."""
    if part == "mtp":
        return ("mtp." + ours,)
    if ours.startswith("lm_head."):
        return (ours,)
    return ("model.language_model." + ours, "model." + ours)
