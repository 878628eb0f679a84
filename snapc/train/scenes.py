"""The training scenes of a trained reference family, for recovery and step distillation.

Apart from snapc.train.data because the latent family's scenes (snapc.shapes_latent.family)
build on the pixel ones defined there: this module sits above both.
"""

from __future__ import annotations

import torch

from snapc.families import is_latent_family
from snapc.shapes_latent.family import LatentScenes
from snapc.train.data import NoisedBatches, ShapesScenes

__all__ = ["family_scenes"]


def family_scenes(base: str, batch_size: int, seed: int, device: torch.device,
                  caption_dropout: float) -> NoisedBatches:
    """Return the training scenes of a trained family's base (``shapes``: pixels,
    ``shapes-latent``: scenes through its frozen encoder); callers check
    ``snapc.families.is_trained_family(base)`` first."""
    if is_latent_family(base):
        return LatentScenes(batch_size, seed, device, caption_dropout)
    return ShapesScenes(batch_size, seed, device, caption_dropout)
