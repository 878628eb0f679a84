"""Where the decoder's distillation latents come from (one interface, three sources).

- :class:`LatentFile`: latents sampled by the pipeline's UNet (SnapFusion's data
  distillation), saved once as ``latents`` (N, C, h, w) in a ``.safetensors`` file; each batch
  draws rows of the pool.
- :class:`EncodedScenes`: the encoder of the autoencoder being compressed, on the shapes
  scenes at 64x64 (posterior samples), for shapes-latent before its UNet exists.
- :class:`RandomLatents`: Gaussian latents at the autoencoder's latent scale
  (``N(0, 1) / scaling_factor``), for tests and random-weight smoke runs.

Every batch is drawn whole from the loop's generator of (seed, step), then sliced to the rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from snapc.errors import SnapcError
from snapc.train.distributed import World
from snapc.train.loop import batch_generator

__all__ = ["LatentSource", "LatentFile", "EncodedScenes", "RandomLatents", "LatentsError"]


class LatentsError(SnapcError):
    """A latents file that is missing, corrupt or of the wrong shape."""


class LatentSource(Protocol):
    """Latents for global batch ``step``: (batch, C, h, w) raw latents on the device."""

    device: torch.device

    def latents(self, step: int, batch: int, world: World) -> torch.Tensor:
        """Return this rank's rows of global batch ``step``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Return what the source is (written in the training record)."""
        ...


class RandomLatents:
    """Gaussian raw latents ``N(0, 1) / scaling_factor`` of shape (C, h, w)."""

    def __init__(self, shape: tuple[int, int, int], scaling_factor: float, seed: int,
                 device: torch.device) -> None:
        self.shape, self.scale, self.seed, self.device = shape, scaling_factor, seed, device

    def latents(self, step: int, batch: int, world: World) -> torch.Tensor:
        """Return this rank's rows of global batch ``step``."""
        gen = batch_generator(self.seed, step, self.device, stream=5)
        z = torch.randn(batch, *self.shape, generator=gen, device=self.device) / self.scale
        return z[world.local_slice(batch)]

    def describe(self) -> dict[str, Any]:
        """Return the source's settings."""
        return {"source": "random", "shape": list(self.shape), "scaling_factor": self.scale}


class LatentFile:
    """A pool of UNet-sampled raw latents from a ``.safetensors`` file (key ``latents``)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], seed: int,
                 device: torch.device) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            pool = load_file(str(path))["latents"]
        except (OSError, RuntimeError, KeyError, SafetensorError) as exc:
            raise LatentsError(f"cannot read latents from {path} ({exc}); pass a .safetensors "
                               "file with a 'latents' (N, C, h, w) tensor") from None
        if pool.ndim != 4 or pool.shape[1] != shape[0]:
            raise LatentsError(f"{path} holds latents of shape {tuple(pool.shape)}; this "
                               f"decoder takes (N, {shape[0]}, h, w)")
        self.path, self.seed, self.device = path, seed, device
        self.pool = pool.float().to(device)

    def latents(self, step: int, batch: int, world: World) -> torch.Tensor:
        """Return this rank's rows of global batch ``step`` (pool rows drawn at random)."""
        gen = batch_generator(self.seed, step, self.device, stream=5)
        rows = torch.randint(len(self.pool), (batch,), generator=gen, device=self.device)
        return self.pool[rows][world.local_slice(batch)]

    def describe(self) -> dict[str, Any]:
        """Return the file and pool size."""
        return {"source": "file", "path": str(self.path), "pool": len(self.pool)}


class EncodedScenes:
    """Posterior samples of the autoencoder's encoder on shapes scenes at 64x64."""

    def __init__(self, vae: nn.Module, seed: int, device: torch.device) -> None:
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.seed, self.device = seed, device

    @torch.no_grad()
    def latents(self, step: int, batch: int, world: World) -> torch.Tensor:
        """Return this rank's rows of global batch ``step``."""
        from snapc.shapes.data import sample_codes
        from snapc.shapes_latent.config import scenes

        gen = batch_generator(self.seed, step, self.device, stream=5)
        codes = sample_codes(batch, split="train", generator=gen, device=self.device)
        mine = scenes(codes[world.local_slice(batch)])
        posterior = self.vae.encode(mine).latent_dist
        full = (batch, *posterior.mean.shape[1:])  # drawn whole: same rows under DDP
        noise = torch.randn(full, generator=gen, device=self.device)[world.local_slice(batch)]
        return posterior.mean + posterior.std * noise

    def describe(self) -> dict[str, Any]:
        """Return the source's settings."""
        return {"source": "encoded-scenes", "resolution": 64}
