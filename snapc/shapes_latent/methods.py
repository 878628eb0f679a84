"""shapes-latent's two training phases as methods of snapc.train.loop's ``train``.

- :class:`AutoencoderTraining`: the AutoencoderKL on 64x64 scenes, loss = MSE(reconstruction,
  scene) + kl x KL(posterior || N(0, I)) averaged per latent element (the posterior sampled
  with the batch's noise, so a resumed run sees the same draws). Default kl 1e-6: SD 1.x's
  autoencoder weighs its summed KL 1e-6 against a summed per-pixel loss, about 1e-7 in this
  per-element normalisation; a light KL keeps reconstructions sharp enough to decode.
- :class:`LatentDiffusion`: the latent UNet and a shapes-design text encoder, trained together
  as ``shapes`` was (DDPM epsilon prediction, shapes' cosine schedule, caption dropout for
  CFG) on the frozen autoencoder's posterior means times its ``scaling_factor``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snapc.shapes.data import sample_codes
from snapc.shapes.schedule import TRAIN_STEPS, add_noise
from snapc.shapes.text import TextEncoder, caption_tokens
from snapc.shapes_latent.config import scenes
from snapc.train.distributed import World
from snapc.train.loop import Batch, batch_generator

__all__ = ["AutoencoderTraining", "LatentDiffusion", "encode_latents"]


def _codes(seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor,
                                                                          torch.Generator]:
    gen = batch_generator(seed, step, device)
    return sample_codes(batch, split="train", generator=gen, device=device), gen


class _Reconstruct(nn.Module):
    """Encode, sample the posterior with given noise, decode: (reconstruction, KL per elem)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """Return the reconstruction and the mean KL per latent element."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * noise
        recon = self.vae.decode(z).sample
        return recon, posterior.kl().mean() / noise[0].numel()


class AutoencoderTraining:
    """Train an AutoencoderKL to reconstruct shapes scenes at 64x64 (MSE + KL)."""

    name = "shapes-latent-vae"
    find_unused_parameters = False

    def __init__(self, vae: nn.Module, batch: int, device: torch.device, *, kl: float = 1e-6,
                 seed: int = 0) -> None:
        self.student = _Reconstruct(vae.to(device).train())
        self.global_batch, self.device, self.kl, self.seed = batch, device, kl, seed

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's scenes of global batch ``step`` and their posterior noise."""
        codes, gen = _codes(self.seed, step, self.global_batch, self.device)
        config = self.student.vae.config
        side = scenes(codes[:1]).shape[-1] // 2 ** (len(config.block_out_channels) - 1)
        noise = torch.randn(self.global_batch, config.latent_channels, side, side,
                            generator=gen, device=self.device)
        rows = world.local_slice(self.global_batch)
        return {"images": scenes(codes[rows]), "noise": noise[rows]}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return MSE + kl x KL and both parts."""
        recon, kl = model(batch["images"], batch["noise"])
        rec = F.mse_loss(recon.float(), batch["images"])
        return rec + self.kl * kl.float(), {"recon": rec.item(), "kl": kl.item()}

    def describe(self) -> dict[str, Any]:
        """Return the phase's settings."""
        return {"method": self.name, "kl_weight": self.kl, "config": dict(
            self.student.vae.config), "data": "shapes scenes 64x64 (train split)"}


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return the scaled latents (posterior mean x scaling_factor) of images in [-1, 1]."""
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


class _Denoise(nn.Module):
    """The latent UNet and its text encoder as one module: eps of (x_t, t, tokens)."""

    def __init__(self, unet: nn.Module, text: TextEncoder) -> None:
        super().__init__()
        self.unet, self.text = unet, text

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Return the predicted noise."""
        return self.unet(x_t, t, self.text(tokens), return_dict=False)[0]


class LatentDiffusion:
    """Train the latent UNet and a text encoder on the frozen autoencoder's latents."""

    name = "shapes-latent-unet"
    find_unused_parameters = False

    def __init__(self, unet: nn.Module, text: TextEncoder, vae: nn.Module, batch: int,
                 device: torch.device, *, caption_dropout: float = 0.1, seed: int = 0) -> None:
        self.student = _Denoise(unet.to(device).train(), text.to(device).train())
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.global_batch, self.device = batch, device
        self.caption_dropout, self.seed = caption_dropout, seed

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's noised latents, noise, timesteps and (dropped-out) tokens."""
        codes, gen = _codes(self.seed, step, self.global_batch, self.device)
        rows = world.local_slice(self.global_batch)
        n = self.global_batch
        tokens = caption_tokens(codes)
        drop = torch.rand(n, generator=gen, device=self.device) < self.caption_dropout
        tokens = torch.where(drop.unsqueeze(1), torch.zeros_like(tokens), tokens)
        t = torch.randint(0, TRAIN_STEPS, (n,), generator=gen, device=self.device)
        x0 = encode_latents(self.vae, scenes(codes[rows]))
        noise = torch.randn((n, *x0.shape[1:]), generator=gen, device=self.device)[rows]
        return {"x_t": add_noise(x0, noise, t[rows]), "t": t[rows].float(), "noise": noise,
                "tokens": tokens[rows]}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the epsilon MSE."""
        eps = model(batch["x_t"], batch["t"], batch["tokens"]).float()
        loss = F.mse_loss(eps, batch["noise"])
        return loss, {"eps_mse": loss.item()}

    def describe(self) -> dict[str, Any]:
        """Return the phase's settings."""
        return {"method": self.name, "caption_dropout": self.caption_dropout,
                "unet_config": dict(self.student.unet.config),
                "scaling_factor": float(self.vae.config.scaling_factor),
                "data": "shapes scenes 64x64 through the frozen autoencoder (train split)"}
