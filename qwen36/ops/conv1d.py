"""Depthwise causal 1-D convolution with a carried state (DeltaNet's short conv; no bias, no activation).

  x      [B, T, C]     new inputs
  weight [C, W]        tap W-1 multiplies the current token
  state  [B, W-1, C]   the previous W-1 inputs (zeros at sequence start)
returns y [B, T, C] and the new state [B, W-1, C].
"""
from __future__ import annotations

import torch


def causal_conv1d_reference(x, weight, state):
    W = weight.shape[1]
    xs = torch.cat([state.to(x.dtype), x], dim=1)                              # [B, W-1+T, C]
    T = x.shape[1]
    y = sum(xs[:, j:j + T] * weight[:, j] for j in range(W))
    return y, xs[:, xs.shape[1] - (W - 1):]


def causal_conv1d(x, weight, state, per_token: bool = False):
    """per_token: each output with decode's arithmetic (speculative verification must match decoding bit
    for bit); otherwise T > 1 uses the faster shifted form."""
    W, T = weight.shape[1], x.shape[1]
    xs = torch.cat([state.to(x.dtype), x], dim=1)
    if T == 1:  # decode: one output per channel; a grouped conv call costs more than the math
        y = (xs * weight.t()).sum(1, keepdim=True)
    elif per_token:
        y = torch.cat([(xs[:, t:t + W] * weight.t()).sum(1, keepdim=True) for t in range(T)], dim=1)
    else:  # W shifted multiply-adds in place: faster than F.conv1d's depthwise path (channels last)
        y = xs[:, :T] * weight[:, 0]
        for j in range(1, W):
            y.addcmul_(xs[:, j:j + T], weight[:, j])
    return y, xs[:, xs.shape[1] - (W - 1):]
