"""The vision tower (`model.visual.*`): pixels of images and video frames -> text-width tokens.

  x = patches @ patch_embed.proj (Conv3d, kernel = stride: one matmul on the flattened patch) + bias
  x += pos_embed resampled to the (h, w) grid (bilinear, align_corners=True), repeated over the t frames
  for each block:  x = x + proj(Attn(LN1(x)))          2-D RoPE on q, k; attention only within a frame
                   x = x + fc2(act(fc1(LN2(x))))       act = hidden_act (gelu_pytorch_tanh)
  y = fc2(GELU(fc1(LN(x) viewed as groups of merge^2 patches)))     the merger, exact GELU
Shapes: P patches in merge-block order (the processor emits the m x m patches of each merge block
consecutively, blocks in raster order, frame after frame), D hidden size, m spatial_merge_size. The
output has P / m^2 tokens of out_hidden_size, one per merge block, ready to replace the pad tokens.

Memory and dtype: the weights stay in the dtype they are loaded in (`load_vision_tower(dtype=...)`),
and each layer upcasts its weights to the compute dtype when it runs, so only one matrix exists in
fp32 at a time. Loaded in bf16 on the CPU (as the real checkpoint stores it), the tower is the
memory-mapped file itself: 0.44 B params = 0.9 GB of file-backed pages, no extra copy; the upcasts
cost ~0.3 s a forward on 2 cores (a 448x448 image, 784 patches: 4.7 s against 4.4 s with fp32
weights). dtype=fp32 converts once at load (1.8 GB resident) and skips the casts. Activations are
fp32 on the CPU whatever the storage: bf16 matmul there is ~500x slower. The 2-D RoPE is always fp32.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointError
from .config import VisionConfig
from .layers.linear import Linear

PREFIX = "model.visual."
ROPE_THETA = 10000.0
LN_EPS = 1e-6
ACTIVATIONS = {
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}

Grid = tuple[int, int, int]


def _grids(grid_thw: torch.Tensor | Iterable[Sequence[int]]) -> list[Grid]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def num_merged_tokens(grid_thw, spatial_merge_size: int = 2) -> list[int]:
    """Output tokens per image / video: t*h*w / m^2 (grid_thw [n, 3] tensor or a list of (t, h, w))."""
    return [t * h * w // spatial_merge_size ** 2 for t, h, w in _grids(grid_thw)]


class LayerNorm(nn.Module):
    """LayerNorm with bias; the stored weights are cast to the input dtype on use."""

    def __init__(self, dim: int, eps: float = LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PatchConv(nn.Module):
    """Conv3d with kernel = stride: a linear map of the flattened [C, T, P, P] patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg
        self.weight = nn.Parameter(torch.empty(c.hidden_size, c.in_channels, c.temporal_patch_size,
                                               c.patch_size, c.patch_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, C*T*ps*ps] -> [P, D]"""
        w = self.weight.reshape(self.weight.shape[0], -1).to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = PatchConv(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PosTable(nn.Module):
    """The learned side x side position grid, stored flat as [side^2, D]."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim), requires_grad=False)


def _block_order(x: torch.Tensor, m: int) -> torch.Tensor:
    """[h, w, ...] raster grid -> [h*w, ...] in merge-block order (block row, block col, row, col)."""
    h, w, rest = x.shape[0], x.shape[1], x.shape[2:]
    x = x.reshape(h // m, m, w // m, m, *rest).transpose(1, 2)
    return x.reshape(h * w, *rest)


def _axis_taps(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps of n target points on a side-long axis: index, weight [n, 2]."""
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)   # n=1 maps to 0
    lo = src.floor()
    offset = torch.arange(2)
    index = (lo.long()[:, None] + offset).clamp(max=side - 1)               # the +1 tap of the last point has weight 0
    weight = (1 - (src[:, None] - lo[:, None] - offset).abs()).clamp(min=0)
    return index, weight


def resample_positions(table: torch.Tensor, h: int, w: int, m: int) -> torch.Tensor:
    """table [side^2, D] -> [h*w, D] resampled to the (h, w) grid, in merge-block order."""
    side = math.isqrt(table.shape[0])
    hi, hw = _axis_taps(h, side)
    wi, ww = _axis_taps(w, side)
    index = (hi[:, None, :, None] * side + wi[None, :, None, :]).reshape(h, w, 4).to(table.device)
    weight = (hw[:, None, :, None] * ww[None, :, None, :]).reshape(h, w, 4, 1).to(table.device)
    grid = (table[index] * weight).sum(2)                                    # [h, w, D]: h0w0+h0w1+h1w0+h1w1
    return _block_order(grid, m)


def rope_angles(h: int, w: int, m: int, head_dim: int, device) -> torch.Tensor:
    """[h*w, head_dim] fp32 angles of the 2-D RoPE: [row*inv | col*inv] twice, inv = theta^(-4j/head_dim)."""
    half = head_dim // 2                                                     # h and w each get head_dim/4 freqs
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = _block_order(torch.stack([rows, cols], -1), m).float()             # [h*w, 2]
    angles = (pos[:, :, None] * inv).flatten(1)                              # [h*w, head_dim/2]
    return torch.cat([angles, angles], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the full head dim, in fp32: x [N, heads, hd], cos/sin [N, 1, hd]."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-b, a], dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, D // cfg.num_heads
        self.qkv = Linear(D, 3 * D, bias=True)                               # rows q | k | v, each heads x head_dim
        self.proj = Linear(D, D, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """x [N, D]; runs: (first row, frames, frame length) of consecutive equal-length frames."""
        N, H, d = x.shape[0], self.heads, self.head_dim
        q, k, v = self.qkv(x).view(N, 3, H, d).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty(N, H, d, dtype=x.dtype, device=x.device)
        for start, count, length in runs:                                    # each frame attends only to itself
            rows = slice(start, start + count * length)

            def frames(t):  # [count*length, H, d] -> [count, H, length, d]
                return t[rows].view(count, length, H, d).transpose(1, 2)

            o = F.scaled_dot_product_attention(frames(q), frames(k), frames(v))
            out[rows] = o.transpose(1, 2).reshape(count * length, H, d)
        return self.proj(out.view(N, H * d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported; supported: {list(ACTIVATIONS)}")
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size)
        self.norm2 = LayerNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, runs):
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each m x m block's patches concatenated -> linear, GELU, linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        M = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm = LayerNorm(cfg.hidden_size)
        self.linear_fc1 = Linear(M, M, bias=True)
        self.linear_fc2 = Linear(M, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, D] -> [P/m^2, out_hidden_size]"""
        x = self.norm(x).view(-1, self.linear_fc1.weight.shape[1])
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision head dim hidden_size/num_heads = {cfg.hidden_size}/{cfg.num_heads} "
                             "must be a multiple of 4")
        side = math.isqrt(cfg.num_position_embeddings)
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {cfg.num_position_embeddings} is not a square")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = PosTable(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.compute_dtype = torch.float32

    def _check(self, pixel_values: torch.Tensor, grids: list[Grid]) -> None:
        c, m = self.cfg, self.cfg.spatial_merge_size
        width = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
        rows = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (rows, width):
            raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; grid_thw {[list(g) for g in grids]} "
                             f"needs [{rows}, {width}]")
        bad = [g for g in grids if min(g) < 1 or g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"grid_thw {list(bad[0])}: t, h, w must be positive and h, w multiples of {m}")

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values [P, C*T*ps*ps], grid_thw [n, 3] -> [P/m^2, out_hidden_size] in the compute dtype."""
        grids = _grids(grid_thw)
        self._check(pixel_values, grids)
        m, hd = self.cfg.spatial_merge_size, self.cfg.hidden_size // self.cfg.num_heads
        device = self.pos_embed.weight.device
        x = self.patch_embed(pixel_values.to(device=device, dtype=self.compute_dtype))
        table = self.pos_embed.weight.float()
        pos, angles, runs, start = [], [], [], 0
        per_grid: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for t, h, w in grids:                                                # tables per (h, w), repeated per frame
            if (h, w) not in per_grid:
                per_grid[h, w] = resample_positions(table, h, w, m), rope_angles(h, w, m, hd, device)
            p, a = per_grid[h, w]
            pos.append(p.repeat(t, 1))
            angles.append(a.repeat(t, 1))
            if runs and runs[-1][2] == h * w:                                # same frame length: one batched SDPA
                runs[-1] = (runs[-1][0], runs[-1][1] + t, h * w)
            else:
                runs.append((start, t, h * w))
            start += t * h * w
        x = x + torch.cat(pos).to(x.dtype)
        angles = torch.cat(angles)[:, None, :]                               # [P, 1, hd] fp32
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin, runs)
        return self.merger(x)

    def encode(self, pixel_values: torch.Tensor, grid_thw) -> list[torch.Tensor]:
        """forward, split per image / video: [t*h*w/m^2, out_hidden_size] each."""
        out = self(pixel_values, grid_thw)
        return list(out.split(num_merged_tokens(grid_thw, self.cfg.spatial_merge_size)))


def load_vision_tower(ckpt: Checkpoint, cfg: VisionConfig | None, dtype: torch.dtype = torch.bfloat16,
                      device="cpu", compute_dtype: torch.dtype | None = None) -> VisionTower | None:
    """The tower from the checkpoint's `model.visual.*` tensors, weights kept in `dtype` (see the module
    docstring); None if there are none. Every tensor is checked (missing, shape, dtype, unexpected) before
    any is read; errors name the file and the tensor. compute_dtype defaults to fp32 on the CPU, else dtype."""
    disk = [n for n in ckpt.names() if n.startswith(PREFIX)]
    if not disk:
        return None
    if cfg is None:
        raise CheckpointError(f"{ckpt.path}: tensors {disk[0]!r}, ... of a vision tower, but config.json has "
                              "no vision_config")
    device = torch.device(device)
    with torch.device("meta"):
        tower = VisionTower(cfg)
    expected = {name: tuple(p.shape) for name, p in tower.state_dict().items()}
    unexpected = [n for n in disk if n[len(PREFIX):] not in expected]
    if unexpected:
        raise CheckpointError(f"{ckpt.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r} "
                              f"(not part of the vision tower config.json describes)")
    for name, shape in expected.items():
        full = PREFIX + name
        if full not in ckpt.where:
            raise CheckpointError(f"{ckpt.path}: missing tensor {full!r}")
        got = tuple(ckpt.shape(full))
        if got != shape:
            raise CheckpointError(f"{ckpt.file_of(full)}: tensor {full!r} has shape {list(got)}, "
                                  f"config.json implies {list(shape)}")
        if ckpt.dtype_str(full) not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.file_of(full)}: tensor {full!r} has unsupported dtype "
                                  f"{ckpt.dtype_str(full)}; expected one of {list(FLOAT_DTYPES)}")
    # already in dtype on the CPU: the memory-mapped view itself, no copy
    tensors = {name: ckpt.tensor(PREFIX + name).to(device=device, dtype=dtype) for name in expected}
    tower.load_state_dict(tensors, strict=True, assign=True)
    tower.requires_grad_(False)
    tower.compute_dtype = compute_dtype or (torch.float32 if device.type == "cpu" else dtype)
    return tower
