"""Data distillation of a pruned decoder from the original one, as a training-loop method.

The student is the pruned autoencoder (only its decode path trains: ``post_quant_conv`` and
the decoder; the encoder is frozen), the teacher the original. On each batch of latents
(:mod:`snapc.decoder.latents`):

    loss = pixel x MSE(student image, teacher image)
         + feature x mean over stages of MSE(student stage output, teacher stage output)

where the stages are the decoder's mid block and each up block. Where block widths were
pruned, the teacher's stage output is compared on the channels the student kept
(:meth:`PruneRecord.stage_channels`); otherwise the maps compare one to one.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snapc.decoder.latents import LatentSource
from snapc.errors import SnapcError
from snapc.train.distributed import World
from snapc.train.features import capture_outputs, feature_loss
from snapc.train.loop import Batch

__all__ = ["DecoderLoss", "DecoderDistillation", "decoder_stages", "capture_decoder_stages"]


@dataclass(frozen=True)
class DecoderLoss:
    """Weights of the decoder distillation loss: pixel MSE and feature (stage output) MSE."""

    pixel: float = 1.0
    feature: float = 1.0

    def check(self) -> None:
        """Raise SnapcError when a weight is negative or both are zero."""
        if min(self.pixel, self.feature) < 0 or max(self.pixel, self.feature) == 0:
            raise SnapcError("loss weights must be >= 0 and not both 0 "
                             "(--pixel-weight, --feature-weight)")

    def to_json(self) -> dict:
        """Return the weights as a JSON-ready dict."""
        return asdict(self)


def decoder_stages(vae: nn.Module) -> dict[str, nn.Module]:
    """Return {stage name: module} of an AutoencoderKL decoder: mid block, then up blocks."""
    stages = {"mid_block": vae.decoder.mid_block}
    return stages | {f"up_blocks.{i}": b for i, b in enumerate(vae.decoder.up_blocks)}


def capture_decoder_stages(vae: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]:
    """Capture each decoder stage's output during forwards inside the block (the UNet's
    stage capture, snapc.train.features.capture_outputs, on the decoder's stages)."""
    return capture_outputs(decoder_stages(vae))


def _decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents, return_dict=False)[0]


class _DecodeModule(nn.Module):
    """The student seen by the loop (and DDP): forward decodes latents."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Return the decoded images of raw latents."""
        return _decode(self.vae, latents)


class DecoderDistillation:
    """Train a pruned decoder to match the original on latents (pixel + feature loss)."""

    name = "decoder-distillation"
    find_unused_parameters = False

    def __init__(self, teacher: nn.Module, pruned: nn.Module, record: dict[str, Any],
                 latents: LatentSource, batch: int, weights: DecoderLoss,
                 stage_channels: dict[str, list[int]] | None = None) -> None:
        """``pruned`` is the student's starting point (it is copied, not trained in place);
        ``record`` the pruning record (checked on resume); ``batch`` the global batch;
        ``stage_channels`` the teacher channels each narrowed stage output keeps."""
        device = latents.device
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        vae = copy.deepcopy(pruned).to(device).requires_grad_(False)
        vae.decoder.requires_grad_(True)
        if vae.post_quant_conv is not None:
            vae.post_quant_conv.requires_grad_(True)
        self.student = _DecodeModule(vae).train()
        self.record, self.latents, self.global_batch = record, latents, batch
        self.weights = weights
        self.stage_channels = {k: torch.tensor(v, device=device)
                               for k, v in (stage_channels or {}).items()}

    @property
    def vae(self) -> nn.Module:
        """Return the student autoencoder (the pruned one being trained)."""
        return self.student.vae

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's latents of global batch ``step``."""
        return {"latents": self.latents.latents(step, self.global_batch, world)}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted distillation loss of the student and its parts."""
        z = batch["latents"]
        with torch.no_grad(), capture_decoder_stages(self.teacher) as teacher_stages:
            target = _decode(self.teacher, z)
        with capture_decoder_stages(self.vae) as student_stages:
            image = model(z).float()
        pixel = F.mse_loss(image, target.float())
        for name, kept in self.stage_channels.items():
            teacher_stages[name] = teacher_stages[name].index_select(1, kept)
        feat = feature_loss(student_stages, teacher_stages)
        loss = self.weights.pixel * pixel + self.weights.feature * feat
        return loss, {"pixel": pixel.item(), "feature": feat.item()}

    def describe(self) -> dict[str, Any]:
        """Return the pruning record, loss weights and latent source."""
        return {"method": self.name, "pruning": self.record, "loss": self.weights.to_json(),
                "latents": self.latents.describe()}
