"""shapes-latent end to end: load the shipped weights, sample latents, decode, check scenes.

Sampling is DDIM (eta 0) with classifier-free guidance on shapes' cosine schedule and
timesteps (``snapc.shapes.sampler.ddim_timesteps``), written here rather than reusing
``snapc.shapes.sampler.sample`` because that one clips x0 to the pixel range [-1, 1]; here x0
is clipped to the encoder's latent range (:func:`latent_range`). Some clip is needed: the
cosine schedule's alpha-bar at t = 999 is 2.4e-9, so the first step's x0 estimate carries the
UNet's eps error times 1 / sqrt(alpha-bar) = 2e4 (unclipped, a UNet whose one-step x0 from
t = 900 decodes to 0.93 adherence sampled pictures at 0.14). Pictures are read back at 32x32
(``to_shapes_resolution``) by the shapes scene decoder, so prompt adherence is the same
metric as for ``shapes``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from snapc.errors import WeightsError
from snapc.shapes.data import decode, match_score, objects_of
from snapc.shapes.sampler import ddim_timesteps
from snapc.shapes.schedule import alphas_cumprod
from snapc.shapes.text import TextEncoder, tokenize
from snapc.shapes_latent.config import LATENT_SIZE, WEIGHTS_DIR, scenes, to_shapes_resolution

__all__ = ["load_autoencoder_and_text", "load_pipeline", "latent_range", "sample_latents",
           "generate", "scene_accuracy", "reconstruction_accuracy"]

RANGE_SCENES = 256  # seeded training scenes the latent range is read from
RANGE_QUANTILE = 0.999  # of |latent|: on the first trained pipeline, 6.0 (max 7.6), 48 prompts
# sampled to adherence 0.85 clipped there, 0.80 at 8, 0.53 at 12, 0.14 unclipped


def _check_weights(weights_dir: Path, parts: tuple[str, ...]) -> None:
    for part in parts:
        if not (weights_dir / part).is_file():
            raise WeightsError(f"{weights_dir / part} missing; train shapes-latent with "
                               "`python bench/train_shapes_latent.py all --minutes M`")


# low_cpu_mem_usage=False: accelerate is no dependency, and without it diffusers prints an
# install hint on every load (the loading itself is the same)
_QUIET = {"low_cpu_mem_usage": False}


def load_autoencoder_and_text(weights_dir: Path = WEIGHTS_DIR) -> tuple[nn.Module, TextEncoder]:
    """Return (vae, text_encoder) of shapes-latent without its UNet, eval mode, fp32.

    Raises WeightsError naming the training command when a file is missing.
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    _check_weights(weights_dir, ("vae/config.json", "text_encoder.safetensors"))
    vae = AutoencoderKL.from_pretrained(weights_dir / "vae", **_QUIET).float().eval()
    text = TextEncoder()
    text.load_state_dict({k: v.float() for k, v in
                          load_file(str(weights_dir / "text_encoder.safetensors")).items()})
    return vae, text.eval()


def load_pipeline(weights_dir: Path = WEIGHTS_DIR) -> tuple[nn.Module, nn.Module, TextEncoder]:
    """Return (vae, unet, text_encoder) of shapes-latent, eval mode, fp32.

    Raises WeightsError naming the training command when a phase's files are missing.
    """
    from diffusers import UNet2DConditionModel

    _check_weights(weights_dir, ("vae/config.json", "unet/config.json",
                                 "text_encoder.safetensors"))
    vae, text = load_autoencoder_and_text(weights_dir)
    unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet", **_QUIET).float().eval()
    return vae, unet, text


@torch.no_grad()
def latent_range(vae: nn.Module) -> float:
    """Return the bound sampling clips x0 to: the RANGE_QUANTILE quantile of |scaled latent|
    (posterior mean x scaling_factor) over RANGE_SCENES seeded training scenes; computed once
    per autoencoder object (about a second on a CPU)."""
    cached = getattr(vae, "_snapc_latent_range", None)
    if cached is None:
        from snapc.shapes.data import sample_codes

        device = next(vae.parameters()).device
        gen = torch.Generator().manual_seed(4242)  # on the CPU: the same scenes on any device
        codes = sample_codes(RANGE_SCENES, split="train", generator=gen).to(device)
        z = vae.encode(scenes(codes)).latent_dist.mean.float() * vae.config.scaling_factor
        cached = float(z.abs().flatten().quantile(RANGE_QUANTILE))
        vae._snapc_latent_range = cached
    return cached


@torch.no_grad()
def sample_latents(unet: nn.Module, context: torch.Tensor, uncond: torch.Tensor | None, *,
                   steps: int = 25, guidance: float = 3.0, noise: torch.Tensor,
                   x0_range: float | None = None, spacing: str = "linspace",
                   guidance_embedded: bool = False, alpha_floor: float = 0.0) -> torch.Tensor:
    """Return scaled latents sampled by DDIM with CFG from start ``noise`` (B, C, h, w);
    each step's x0 estimate is clipped to [-x0_range, x0_range] (None: not clipped) and the
    eps of the step recomputed from it, as diffusers' DDIMScheduler does with clip_sample.

    ``spacing``, ``guidance_embedded`` (one conditional call per step; ``uncond`` and
    ``guidance`` unused) and ``alpha_floor`` (the x0 estimate divides by
    max(sqrt(alpha_bar), alpha_floor)) are those of :class:`snapc.shapes.sampler.SamplerSpec`.
    """
    ab = alphas_cumprod(noise.device)
    x = noise.float()
    guided = not guidance_embedded and uncond is not None
    if guided:
        uncond = uncond.expand_as(context)
    times = ddim_timesteps(steps, spacing)
    x0 = x
    for i, t in enumerate(times):
        if guided:
            tt = torch.full((2 * len(x),), float(t), device=x.device)
            both = unet(torch.cat([x, x]), tt, torch.cat([uncond, context]),
                        return_dict=False)[0]
            eps_u, eps_c = both.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            tt = torch.full((len(x),), float(t), device=x.device)
            eps = unet(x, tt, context, return_dict=False)[0].float()
        a = ab[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt().clamp(min=alpha_floor)
        if x0_range is not None:
            x0 = x0.clamp(-x0_range, x0_range)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if i == len(times) - 1:
            break
        a_next = ab[times[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0


@torch.no_grad()
def generate(vae: nn.Module, unet: nn.Module, text: TextEncoder, captions: list[str], *,
             steps: int = 25, guidance: float = 3.0, seed: int = 0, batch: int = 250,
             device: torch.device | str = "cpu", spacing: str = "linspace",
             guidance_embedded: bool = False, alpha_floor: float = 0.0,
             progress: Callable[[int, int], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (latents, 64x64 images in [-1, 1]) of captions; image i depends on i and seed.

    spacing, guidance_embedded and alpha_floor are :func:`sample_latents`'; progress(done,
    total) is called after each chunk of ``batch`` images.
    """
    device = torch.device(device)
    channels = unet.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), channels, LATENT_SIZE, LATENT_SIZE, generator=gen)
    uncond = text(tokenize([""]).to(device)).float()
    bound = latent_range(vae)
    latents, images = [], []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        context = text(tokenize(chunk).to(device)).float()
        z = sample_latents(unet, context, uncond, steps=steps, guidance=guidance,
                           noise=noise[start:start + batch].to(device), x0_range=bound,
                           spacing=spacing, guidance_embedded=guidance_embedded,
                           alpha_floor=alpha_floor)
        latents.append(z.cpu())
        images.append(vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1).cpu())
        if progress is not None:
            progress(start + len(chunk), len(captions))
    return torch.cat(latents), torch.cat(images)


def scene_accuracy(images: torch.Tensor, codes: torch.Tensor) -> float:
    """Return the fraction of 64x64 images whose decoded scene is exactly the code's scene."""
    found = decode(to_shapes_resolution(images))
    exact = 0
    for code, objs in zip(codes.tolist(), found, strict=True):
        hits, total = match_score(objects_of(int(code)), objs)
        exact += hits == total
    return exact / len(codes)


@torch.no_grad()
def reconstruction_accuracy(vae: nn.Module, codes: torch.Tensor, batch: int = 500) -> float:
    """Return the fraction of scenes whose autoencoder reconstruction (posterior mean) decodes
    to the right scene."""
    device = next(vae.parameters()).device
    recons = []
    for start in range(0, len(codes), batch):
        images = scenes(codes[start:start + batch].to(device))
        z = vae.encode(images).latent_dist.mean
        recons.append(vae.decode(z).sample.float().cpu())
    return scene_accuracy(torch.cat(recons), codes.cpu())
