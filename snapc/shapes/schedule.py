"""The cosine noise schedule of the shapes model (1000 training steps, epsilon prediction)."""

from __future__ import annotations

import math
from functools import cache

import torch

__all__ = ["TRAIN_STEPS", "alphas_cumprod", "add_noise"]

TRAIN_STEPS = 1000


@cache
def _alphas_cumprod_on(device: torch.device, steps: int) -> torch.Tensor:
    s = 0.008
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float().to(device)


def alphas_cumprod(device: torch.device | str = "cpu", steps: int = TRAIN_STEPS) -> torch.Tensor:
    """Return the (steps,) float32 cumulative signal fraction alpha_bar_t, t = 0 .. steps-1."""
    return _alphas_cumprod_on(torch.device(device), steps)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Return x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise for (B,) integer steps t."""
    ab = alphas_cumprod(x0.device)[t.long()].view(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
