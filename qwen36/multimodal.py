"""Image and video tokens inside a text prompt: where their embeddings go and their mRoPE positions.

The prompt builder expands each image to one `<|image_pad|>` per merged patch (t*h*w / merge^2 of them)
and each video to one `<|video_pad|>` run per frame group, separated by timestamp text. The vision tower
turns each item into that many rows of embeddings, which replace the pads' token embeddings.

Positions (3 axes T, H, W), walking the prompt left to right with a running position p:
  text token:        (p, p, p); p += 1
  image (t, h, w)    merged grid (h/m, w/m): token at (row i, col j) gets (p, p + i, p + j);
                     then p += max(h, w) / m
  video              each frame group is its own t=1 item (the timestamps split them)
After the prompt, token number n (0-based over the whole sequence) is at position n + delta for all three
axes, where delta = (largest prompt position + 1) - prompt length. delta is 0 for text-only prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .batch import text_positions


@dataclass(frozen=True)
class MultimodalPrompt:
    positions: torch.Tensor   # [3, L] int64 position of every prompt token
    delta: int                # position - index for every token after the prompt
    rows: torch.Tensor        # [M] int64 prompt indices of the image/video pad tokens, ascending
    embeds: torch.Tensor      # [M, H] vision embeddings for those tokens, in prompt order
    spans: tuple[tuple[int, int, str], ...] = ()   # (start, end, digest) of each pad run: the prefix-cache key

    def positions_for(self, start: int, n: int) -> torch.Tensor:
        """[3, n] positions of tokens start .. start+n-1 of the sequence (prompt or generated)."""
        L = self.positions.shape[1]
        inside = self.positions[:, start:min(start + n, L)]
        first = max(start, L)                                                  # generated tokens from here on
        return torch.cat([inside, text_positions(first, max(0, start + n - first)) + self.delta], dim=1)

    def scatter_into(self, x: torch.Tensor, start: int, n: int, offset: int) -> None:
        """Put the embeddings of pads among tokens start .. start+n-1 into x[offset: offset+n] in place."""
        lo, hi = torch.searchsorted(self.rows, torch.tensor([start, start + n])).tolist()
        if hi > lo:
            x[self.rows[lo:hi] - start + offset] = self.embeds[lo:hi].to(x.dtype)


def mrope_positions(ids: Sequence[int], image_grids: Sequence[Sequence[int]], video_grids: Sequence[Sequence[int]],
                    image_id: int, video_id: int, merge: int) -> tuple[torch.Tensor, int]:
    """ids: the expanded prompt; image_grids / video_grids: (t, h, w) of each image / video in prompt order.
    A video's t frame groups are separate pad runs, one (1, h, w) grid each. -> positions [3, L] int64, delta."""
    queues = {image_id: [tuple(int(v) for v in g) for g in image_grids],
              video_id: [(1, int(h), int(w)) for t, h, w in video_grids for _ in range(int(t))]}
    used = {image_id: 0, video_id: 0}
    ids = list(ids)
    out, p, i, L = [], 0, 0, len(ids)
    while i < L:
        if ids[i] not in queues:
            j = i
            while j < L and ids[j] not in queues:
                j += 1
            out.append(text_positions(p, j - i))
            p, i = p + j - i, j
            continue
        kind, k = ids[i], used[ids[i]]
        what = "image" if kind == image_id else "video frame group"
        if k >= len(queues[kind]):
            raise ValueError(f"the prompt has more {what} pad runs than the {len(queues[kind])} given")
        t, h, w = queues[kind][k]
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        if ids[i:i + n] != [kind] * n:
            raise ValueError(f"{what} {k} (grid {t}x{h}x{w}) needs {n} pad tokens in a row at token {i}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p)
        p, i, used[kind] = p + max(gh, gw), i + n, k + 1
    for kind, q in queues.items():
        if used[kind] != len(q):
            what = "image" if kind == image_id else "video frame group"
            raise ValueError(f"{len(q)} {what}(s) given but the prompt has {used[kind]} {what} pad runs")
    positions = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - L if L else 0
    return positions, delta
