"""Decoder figures: parameters, MACs and predicted latency per device (snapc's cost model).

The decode path (``post_quant_conv`` then ``decoder``) is traced with ``torch.export`` at one
latent of the given size; MACs are summed over its nodes with :func:`snapc.macs.node_macs` and
latency with :meth:`snapc.cost.CostModel.estimate_node` (the analytic roofline of the device
profile, fp16 by default, as ``snapc cost`` predicts for phones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snapc.macs import node_macs

__all__ = ["DecodePath", "decoder_params", "trace_decoder", "decoder_figures"]


class DecodePath(nn.Module):
    """An AutoencoderKL's decode path as one module: latents in, image out."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Return the decoded image of raw (unscaled) latents."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


def decoder_params(vae: nn.Module) -> int:
    """Return the parameter count of the decode path (post_quant_conv + decoder)."""
    return sum(p.numel() for p in DecodePath(vae).parameters())


def trace_decoder(vae: nn.Module, latent_hw: tuple[int, int]) -> torch.export.ExportedProgram:
    """Return the torch.export program of ``vae``'s decode path at one latent of ``latent_hw``."""
    path = DecodePath(vae).eval()
    channels = vae.config.latent_channels
    example = torch.zeros(1, channels, *latent_hw)
    with torch.no_grad():
        return torch.export.export(path, (example,))


def decoder_figures(vae: nn.Module, latent_hw: tuple[int, int],
                    devices: Sequence[str] = ("iphone14pro-ane", "adreno740"),
                    dtype: str = "fp16") -> dict[str, Any]:
    """Return {params, gmacs, ms: {device: predicted ms}} of ``vae``'s decode path."""
    from snapc.cost import CostModel

    program = trace_decoder(vae, latent_hw)
    nodes = list(program.graph.nodes)
    macs = sum(m.macs for m in (node_macs(n) for n in nodes) if m is not None)
    ms = {}
    for device in devices:
        model = CostModel(device, dtype=dtype)
        ms[device] = round(sum(model.estimate_node(n) for n in nodes), 3)
    return {"params": decoder_params(vae), "gmacs": round(macs / 1e9, 4),
            "latent": list(latent_hw), "dtype": dtype, "ms": ms}
