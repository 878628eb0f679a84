"""Deterministic DDIM sampling with classifier-free guidance and x0 clipping.

The sampler is generic over the denoiser: any callable
``eps = unet(sample, timestep, encoder_hidden_states)`` works, whether a diffusers
``UNet2DConditionModel`` (its output object or tuple is unwrapped), a traced snapc graph's
module, or an ONNX session wrapped in a function. Timesteps are passed as float32 (B,) tensors.

One step, with a = alpha_bar_t and a' = alpha_bar of the next (smaller) t, eta = 0::

    x0   = clip((x - sqrt(1 - a) eps) / sqrt(a), -1, 1)
    eps' = (x - sqrt(a) x0) / sqrt(1 - a)         # the noise consistent with the clipped x0
    x    = sqrt(a') x0 + sqrt(1 - a') eps'

and the last step returns x0. Clipping matters: the data are in [-1, 1], and without it the
early high-noise x0 estimates leave visible residual noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from snapc.shapes.schedule import TRAIN_STEPS, alphas_cumprod

__all__ = ["Denoiser", "ddim_timesteps", "sample"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


def _eps(unet: Denoiser, x: torch.Tensor, t: float, context: torch.Tensor) -> torch.Tensor:
    out = unet(x, torch.full((x.shape[0],), float(t), device=x.device), context)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def ddim_timesteps(steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """Return `steps` descending integer timesteps, evenly spaced from train_steps - 1 to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if steps == 1:
        return [train_steps - 1]
    return [round(i * (train_steps - 1) / (steps - 1)) for i in reversed(range(steps))]


@torch.no_grad()
def sample(
    unet: Denoiser,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Return (B, 3, 32, 32) images in [-1, 1] sampled with DDIM (eta 0) from B contexts.

    context: (B, L, D) encoder_hidden_states of the captions; uncond_context: those of the
    empty caption, (1 or B, L, D), or None for no guidance. guidance: the CFG scale w in
    eps = eps_u + w (eps_c - eps_u). noise: the starting x_T, else drawn from `generator`.
    batch_cfg: run conditional and unconditional halves as one batch of 2B (False for a
    denoiser traced at a fixed batch size B).
    """
    b = context.shape[0]
    if noise is None:
        noise = torch.randn(b, 3, 32, 32, generator=generator, device=context.device)
    x = noise.to(context.device, torch.float32)
    ab = alphas_cumprod(x.device)
    if uncond_context is not None:
        uncond_context = uncond_context.expand(b, *context.shape[1:])
    times = ddim_timesteps(steps)
    x0 = x
    for i, t in enumerate(times):
        if uncond_context is None:
            eps = _eps(unet, x, t, context)
        elif batch_cfg:
            both = _eps(unet, torch.cat([x, x]), t, torch.cat([uncond_context, context]))
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps_u = _eps(unet, x, t, uncond_context)
            eps_c = _eps(unet, x, t, context)
            eps = eps_u + guidance * (eps_c - eps_u)
        a = ab[t]
        x0 = ((x - (1 - a).sqrt() * eps.float()) / a.sqrt()).clamp(-1, 1)
        if i == len(times) - 1:
            break
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = ab[times[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0
