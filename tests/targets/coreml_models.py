"""Small torch models and helpers shared by the Core ML target tests (convert in ~1 s)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SkipNet(nn.Module):
    """Conv stack with a long skip connection and an attention-like softmax: 3 weight stages."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1))
        self.proj = nn.Linear(channels, channels)
        self.conv_out = nn.Conv2d(2 * channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        m = self.mid(h)
        b, c, hh, ww = m.shape
        seq = m.flatten(2).transpose(1, 2)
        attn = (seq @ seq.transpose(1, 2) / c**0.5).softmax(-1) @ self.proj(seq)
        m = attn.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(torch.cat([h, m], 1))


def convert(module: nn.Module, example: tuple[torch.Tensor, ...], **kwargs: object):
    """Convert ``module`` with the target's settings (fp16 mlprogram, iOS 17); return MLModel."""
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    inputs = kwargs.pop("inputs", None) or [
        ct.TensorType(name=f"input_{i}", shape=tuple(t.shape), dtype=np.float32)
        for i, t in enumerate(example)]
    return ct.convert(traced, inputs=inputs, convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16,
                      minimum_deployment_target=ct.target.iOS17, skip_model_load=True, **kwargs)
