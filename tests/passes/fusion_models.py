"""Small hand-written UNet pieces in every attention spelling, for the fusion tests.

``MiniUNetBlock`` is a transformer-in-UNet stage: GroupNorm+SiLU, a conv, GroupNorm, a linear
or 1x1-conv ``proj_in``, self-attention, cross-attention and a GEGLU feed-forward, then
``proj_out`` and the residual. ``form`` picks how attention is written: ``baddbmm``
(diffusers' AttnProcessor), ``matmul`` (4-D, scale as ``* s``), ``matmul_div`` (``/ sqrt(d)``),
``q_scaled`` (scale applied to q), ``sdpa`` (already fused).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("baddbmm", "matmul", "matmul_div", "q_scaled", "sdpa")


class Attention(nn.Module):
    """Multi-head attention written in one of FORMS, with an optional additive mask."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, form: str,
                 bias: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.form = heads, head_dim, form
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, s, _ = q.shape
        scale = self.head_dim ** -0.5
        if self.form == "baddbmm":
            q, k, v = (self._to_batch(t) for t in (q, k, v))
            if mask is None:
                base = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
                scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=0, alpha=scale)
            else:
                base = mask.repeat_interleave(self.heads, dim=0)
                scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=1, alpha=scale)
            out = torch.bmm(scores.softmax(dim=-1).to(q.dtype), v)
            return self.to_out(self._from_batch(out, b))
        q, k, v = (t.view(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            if self.form == "q_scaled":
                scores = (q * scale) @ k.transpose(-2, -1)
            elif self.form == "matmul_div":
                scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            else:
                scores = torch.matmul(q, k.transpose(-2, -1)) * scale
            if mask is not None:
                scores = scores + mask
            out = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))

    def _to_batch(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        t = t.reshape(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        return t.reshape(b * self.heads, s, self.head_dim)

    def _from_batch(self, t: torch.Tensor, b: int) -> torch.Tensor:
        _, s, d = t.shape
        t = t.reshape(b, self.heads, s, d).permute(0, 2, 1, 3)
        return t.reshape(b, s, self.heads * d)


class GEGLU(nn.Module):
    """diffusers-style GEGLU feed-forward."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim * mult)
        self.out = nn.Linear(dim * mult, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.drop(hidden * F.gelu(gate)))


class MiniUNetBlock(nn.Module):
    """One transformer-in-UNet stage (see module docstring)."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int,
                 form: str = "baddbmm", linear_projection: bool = True,
                 groups: int = 4) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.linear_projection = linear_projection
        make = (lambda: nn.Linear(channels, channels)) if linear_projection else (
            lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in, self.proj_out = make(), make()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = Attention(channels, channels, heads, head_dim, form)
        self.attn2 = Attention(channels, context_dim, heads, head_dim, form)
        self.ff = GEGLU(channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.silu(self.norm0(x)))
        b, c, hh, ww = h.shape
        t = self.norm(h)
        if self.linear_projection:
            t = self.proj_in(t.permute(0, 2, 3, 1).reshape(b, hh * ww, c))
        else:
            t = self.proj_in(t).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        t = self.attn1(self.ln1(t)) + t
        t = self.attn2(self.ln2(t), context) + t
        t = self.ff(self.ln3(t)) + t
        if self.linear_projection:
            t = self.proj_out(t).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        else:
            t = self.proj_out(t.reshape(b, hh, ww, c).permute(0, 3, 1, 2))
        return t + x


def mini_inputs(channels: int, size: int, context_len: int, context_dim: int,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return seeded (x, context) for MiniUNetBlock."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, channels, size, size, generator=gen),
            torch.randn(1, context_len, context_dim, generator=gen))
