"""The shapes reference model: a miniature SD-layout UNet, its text encoder and shipped weights.

The UNet is a diffusers ``UNet2DConditionModel`` in pixel space (3x32x32, no VAE) with three
resolutions (32, 16, 8), layers_per_block 2, cross-attention at 16x16 and 8x8 in the down and
up paths, and a ``UNetMidBlock2DCrossAttn``: every block kind of SD 1.5 is present. Weights are
fp16 safetensors under ``snapc/weights/shapes/`` and load as fp32; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from snapc import pruned
from snapc.shapes.data import caption
from snapc.shapes.text import TEXT_DIM, TextEncoder, tokenize

__all__ = [
    "UNET_CONFIG",
    "WEIGHTS_DIR",
    "weights_path",
    "build_unet",
    "load_unet",
    "load_text_encoder",
    "encode_captions",
    "example_inputs",
    "removable_blocks",
    "without_block",
]

UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [64, 96, 128],
    "layers_per_block": 2,
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": 4,  # diffusers' name for the head count
    "norm_num_groups": 32,
}
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "shapes"


def weights_path(weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Return the path of the shipped fp16 UNet weights (unet.safetensors)."""
    return weights_dir / "unet.safetensors"


def build_unet() -> UNet2DConditionModel:
    """Return a randomly initialised shapes UNet (fp32, train mode)."""
    return UNet2DConditionModel(**UNET_CONFIG)


def _load(module: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"shipped shapes weights missing: {path}")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def load_unet(weights_dir: Path = WEIGHTS_DIR) -> UNet2DConditionModel:
    """Return the trained shapes UNet in eval mode, fp32, from the committed fp16 weights."""
    return _load(build_unet(), weights_path(weights_dir))


def load_text_encoder(weights_dir: Path = WEIGHTS_DIR) -> TextEncoder:
    """Return the trained shapes text encoder in eval mode, fp32."""
    return _load(TextEncoder(), weights_dir / "text_encoder.safetensors")


@torch.no_grad()
def encode_captions(captions: Sequence[str], text_encoder: TextEncoder) -> torch.Tensor:
    """Return (B, MAX_TOKENS, TEXT_DIM) float32 encoder_hidden_states of captions.

    The empty caption "" gives the unconditional context used for classifier-free guidance.
    """
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(captions).to(device)).float()


def example_inputs(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return seeded (sample, timestep, encoder_hidden_states) of real captions, float32.

    sample is (B, 3, 32, 32) noise, timestep (B,) and encoder_hidden_states (B, 20, 128) from
    the shipped text encoder.
    """
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 3, 32, 32, generator=gen)
    timestep = torch.linspace(900.0, 100.0, batch) if batch > 1 else torch.tensor([500.0])
    codes = torch.randint(0, 504 * 505, (batch,), generator=gen)
    context = encode_captions([caption(int(c)) for c in codes], load_text_encoder())
    return sample, timestep, context


def removable_blocks(unet: UNet2DConditionModel) -> list[str]:
    """Return the names of every resnet and transformer block, in execution order."""
    return pruned.removable_blocks(unet)


def without_block(unet: UNet2DConditionModel, name: str) -> UNet2DConditionModel:
    """Return a copy of unet with one block replaced by its skip path; unet is not changed.

    A resnet becomes its conv_shortcut (or identity); a transformer block becomes identity on
    hidden_states. This is the by-hand reference that graph-level block removal must equal.
    """
    if name not in removable_blocks(unet):
        raise KeyError(f"{name!r} is not a removable block; see removable_blocks()")
    return pruned.skip_blocks(unet, [name])
