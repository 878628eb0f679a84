"""shapes-latent's architecture: a small SD-structured AutoencoderKL and a latent SD-layout UNet.

Scenes are the ``shapes`` scenes at 64x64 (``scenes``). The autoencoder keeps SD's block
structure (ResNet down blocks, a mid block with attention, up blocks of ResNets with
upsamplers) at 4 latent channels and 4x downsampling (16x16x4 latents: the scenes' 3x3 grid
of small shapes needs more than 8x8 cells to decode reliably); the UNet is the ``shapes`` UNet
layout (every SD 1.5 block kind) on those latents; the text encoder is the ``shapes`` design.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from snapc.shapes.data import render
from snapc.shapes.model import UNET_CONFIG as SHAPES_UNET_CONFIG

__all__ = ["IMAGE_SIZE", "LATENT_SIZE", "LATENT_CHANNELS", "VAE_CONFIG", "UNET_CONFIG",
           "WEIGHTS_DIR", "scenes", "to_shapes_resolution", "build_vae", "build_unet"]

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "shapes-latent"

VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # set from the trained encoder's latent std (training.json)
}

UNET_CONFIG: dict = {**SHAPES_UNET_CONFIG, "sample_size": LATENT_SIZE,
                     "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS}


def scenes(codes: torch.Tensor) -> torch.Tensor:
    """Return (B, 3, 64, 64) images in [-1, 1] of scene codes: the shapes renderer's 32x32
    scene, each pixel drawn as a 2x2 square (the same scene at twice the resolution)."""
    return F.interpolate(render(codes), scale_factor=IMAGE_SIZE // 32, mode="nearest")


def to_shapes_resolution(images: torch.Tensor) -> torch.Tensor:
    """Return 64x64 images averaged down to the 32x32 that ``snapc.shapes.data.decode`` reads."""
    return F.avg_pool2d(images.float(), IMAGE_SIZE // 32)


def build_vae(config: dict | None = None):
    """Return a randomly initialised shapes-latent AutoencoderKL (fp32)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE_CONFIG))


def build_unet():
    """Return a randomly initialised shapes-latent UNet2DConditionModel (fp32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)
