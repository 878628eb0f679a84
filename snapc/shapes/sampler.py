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

Timestep spacing (diffusers' ``timestep_spacing``): ``linspace`` runs from T - 1 down to 0, so its
last UNet call, at t = 0 where the image is already clean, changes nothing; ``trailing`` takes
T - 1, T - 1 - T/n, ... (999, 749, 499, 249 for n = 4) and spends every call on a noisy input.

A denoiser with guidance built in (``guidance_embedded``, a guidance-distilled student) is
called once per step on the caption alone; otherwise classifier-free guidance costs two calls.
``alpha_floor`` f > 0 divides the x0 estimate by ``max(sqrt(a), f)`` instead of ``sqrt(a)``:
at the cosine schedule's t = 999 (sqrt(a) = 4.9e-5) an epsilon-predicting network cannot
carry an x0 through ``(x - sqrt(1 - a) eps) / sqrt(a)`` (it would need eps to 1e-5), and with
the floor the same output predicts ``x0 ~ (x - sqrt(1 - a) eps) / f`` instead, a
well-conditioned x0 parametrisation at that one step. Only a denoiser trained that way (the
step-distilled shapes-latent students, :mod:`snapc.train.steps`) is sampled with a floor.
:class:`SamplerSpec` is the recipe stored with a model's weights and carried into manifests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from snapc.shapes.schedule import TRAIN_STEPS, alphas_cumprod

__all__ = ["Denoiser", "SPACINGS", "SamplerSpec", "ddim_timesteps", "sample"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]
SPACINGS = ("linspace", "trailing")


@dataclass(frozen=True)
class SamplerSpec:
    """How a model is sampled: DDIM steps, CFG scale, timestep spacing, guidance built in.

    The defaults are the shapes evaluation protocol (25 linspace steps, CFG 3, two UNet calls
    per step). With ``guidance_embedded`` the denoiser was trained with guidance ``guidance``
    baked in and is called once per step, conditional only. Raises ValueError when a field is
    out of range.
    """

    steps: int = 25
    guidance: float = 3.0
    spacing: str = "linspace"
    guidance_embedded: bool = False
    alpha_floor: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps must be an integer >= 1, not {self.steps!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise ValueError(f"sampler guidance must be a number, not {self.guidance!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"sampler spacing must be one of {', '.join(SPACINGS)}, "
                             f"not {self.spacing!r}")
        if not isinstance(self.guidance_embedded, bool):
            raise ValueError("sampler guidance_embedded must be true or false, "
                             f"not {self.guidance_embedded!r}")
        if isinstance(self.alpha_floor, bool) or not isinstance(self.alpha_floor, (int, float)) \
                or not 0.0 <= self.alpha_floor < 1.0:
            raise ValueError(f"sampler alpha_floor must be a number in [0, 1), "
                             f"not {self.alpha_floor!r}")
        object.__setattr__(self, "guidance", float(self.guidance))  # 3 and 3.0 are one spec
        object.__setattr__(self, "alpha_floor", float(self.alpha_floor))

    @property
    def unet_calls_per_image(self) -> int:
        """Return the denoiser evaluations one image costs (two per step under CFG)."""
        return self.steps * (1 if self.guidance_embedded else 2)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready record (every field)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> SamplerSpec:
        """Return the spec of a stored record; None gives the shapes protocol defaults and a
        missing field its default. Raises ValueError naming an unknown or bad field."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"sampler record must be an object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sampler record has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(data))


def _eps(unet: Denoiser, x: torch.Tensor, t: float, context: torch.Tensor) -> torch.Tensor:
    out = unet(x, torch.full((x.shape[0],), float(t), device=x.device), context)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def ddim_timesteps(steps: int, spacing: str = "linspace", *,
                   train_steps: int = TRAIN_STEPS) -> list[int]:
    """Return `steps` descending integer timesteps.

    ``linspace``: evenly spaced from train_steps - 1 to 0 (one step: train_steps - 1).
    ``trailing``: diffusers' DDIMScheduler formula, round(arange(T, 0, -T / steps)) - 1, so the
    last timestep is T / steps - 1, not 0. Where float rounding makes that arange one element
    too long (steps 61, 103, ... of 1000; diffusers then ends at t = -1), the first `steps`
    are kept.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if spacing == "trailing":
        ratio = train_steps / steps
        return [int(t) - 1 for t in np.round(np.arange(train_steps, 0, -ratio))][:steps]
    if spacing != "linspace":
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, not {spacing!r}")
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
    spacing: str = "linspace",
    guidance_embedded: bool = False,
    alpha_floor: float = 0.0,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Return (B, 3, 32, 32) images in [-1, 1] sampled with DDIM (eta 0) from B contexts.

    context: (B, L, D) encoder_hidden_states of the captions; uncond_context: those of the
    empty caption, (1 or B, L, D), or None for no guidance. guidance: the CFG scale w in
    eps = eps_u + w (eps_c - eps_u). noise: the starting x_T, else drawn from `generator`.
    batch_cfg: run conditional and unconditional halves as one batch of 2B (False for a
    denoiser traced at a fixed batch size B). spacing: "linspace" or "trailing" (see
    :func:`ddim_timesteps`). guidance_embedded: the denoiser has guidance built in; it is
    called once per step on `context`, and uncond_context and guidance are not used.
    alpha_floor: the x0 estimate divides by max(sqrt(alpha_bar), alpha_floor) (module notes).
    timesteps: descending timesteps to run instead of ``ddim_timesteps(steps, spacing)``, with
    `noise` the sample at the first of them (a trajectory started part-way, from a noised
    image).
    """
    b = context.shape[0]
    if noise is None:
        noise = torch.randn(b, 3, 32, 32, generator=generator, device=context.device)
    x = noise.to(context.device, torch.float32)
    ab = alphas_cumprod(x.device)
    if guidance_embedded:
        uncond_context = None
    if uncond_context is not None:
        uncond_context = uncond_context.expand(b, *context.shape[1:])
    times = list(timesteps) if timesteps is not None else ddim_timesteps(steps, spacing)
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
        x0 = ((x - (1 - a).sqrt() * eps.float()) / a.sqrt().clamp(min=alpha_floor)).clamp(-1, 1)
        if i == len(times) - 1:
            break
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = ab[times[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0
