"""Miniature random UNets saved as pruned folders, for the training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from snapc.pruned import PrunedRecord, save_pruned, skip_blocks


def mini_config(*, channels: int, size: int) -> dict:
    """Return a two-level diffusers UNet config (one cross-attention level) of the shapes
    families' text width, ``channels`` in and out at ``size`` x ``size``."""
    return {
        "sample_size": size, "in_channels": channels, "out_channels": channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32], "layers_per_block": 1, "cross_attention_dim": 128,
        "attention_head_dim": 2, "norm_num_groups": 8,
    }


def mini_pruned_folder(parent: Path, name: str, *, base: str, config: dict,
                       removed: tuple[str, ...] = ()) -> Path:
    """Write ``parent/name``: a pruned folder of base ``base`` holding a random UNet of
    ``config`` (seed 0) with ``removed`` skipped, fp32."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    folder = parent / name
    folder.mkdir()
    save_pruned(folder, skip_blocks(unet, removed) if removed else unet, unet.config,
                PrunedRecord(name=name, base=base, removed=removed, random_weights=True),
                dtype=torch.float32)
    return folder
