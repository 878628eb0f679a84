"""Trace the decoder half of a diffusers AutoencoderKL (latents in, image out) to a snapc Graph.

The traced module is :class:`LatentDecoder`: the VAE's own ``post_quant_conv`` and ``decoder``
layers (shared, not copied) behind the latent scaling ``z / scaling_factor + shift_factor``,
so its input is what the sampler produces and its output the image in [-1, 1]. The decoder's
layers sit at the root of the traced module, so the block map names them as diffusers names
them inside ``vae.decoder``: ``mid_block.resnets.{0,1}``, ``mid_block.attentions.0`` and
``up_blocks.{i}.resnets.{j}``, each with its stage (``mid``, ``up.{i}``), resolution,
channels, params and MACs; upsamplers, ``conv_in`` and ``conv_out`` are outside blocks.
Parameter names are those of ``vae.decoder`` plus ``post_quant_conv.*`` (as in the VAE).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from snapc.errors import SnapcError
from snapc.graph import Graph, ModelInfo

__all__ = ["DECODER_INPUT", "DECODER_OUTPUT", "LatentDecoder", "decoder_example_inputs",
           "trace_decoder", "vae_scale"]

DECODER_INPUT = "latents"
DECODER_OUTPUT = "image"


class LatentDecoder(Decoder):
    """The decode path of an AutoencoderKL as one module: unscale, post_quant_conv, decoder.

    A subclass of diffusers' ``Decoder`` whose layers are the VAE decoder's own modules, so
    ``forward`` is diffusers' code (``Decoder.forward``), not a copy of it; ``Decoder.__init__``
    is skipped because it would build new layers. Nothing of ``vae`` is edited.
    """

    def __init__(self, vae: nn.Module) -> None:
        nn.Module.__init__(self)  # not Decoder.__init__: the layers come from vae.decoder
        for name, child in vae.decoder.named_children():
            self.add_module(name, child)
        self.gradient_checkpointing = False
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Return the (B, 3, 8H, 8W) image in [-1, 1] of (B, C, H, W) sampler latents."""
        z = latents / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return super().forward(z)


def vae_scale(vae: nn.Module) -> int:
    """Return how many image pixels one latent pixel spans (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decoder_example_inputs(vae: nn.Module, batch: int, latent: int, seed: int = 0,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor]:
    """Return seeded (latents,) of shape (batch, latent_channels, latent, latent), scaled as a
    sampler's latents are (unit variance times ``scaling_factor``)."""
    if batch < 1 or latent < 1:
        raise SnapcError(f"VAE decoder inputs: batch {batch} and latent {latent} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    channels = int(vae.config.latent_channels)
    latents = torch.randn(batch, channels, latent, latent, generator=gen)
    return (latents.mul(float(vae.config.scaling_factor)).to(device),)


def trace_decoder(vae: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                  source: ModelInfo | None = None) -> Graph:
    """Trace the decoder of a diffusers ``AutoencoderKL`` on ``example_inputs`` ((latents,))
    and return its Graph: input ``latents``, output the image, the decoder's ResNet and
    attention blocks in its block map (names relative to ``vae.decoder``).

    ``vae`` is not edited. Raises SnapcError for a module that is not an AutoencoderKL-style
    VAE (no ``decoder`` / config) and TraceError (naming the failing block) when export fails.
    """
    from snapc.frontend import trace

    if not isinstance(getattr(vae, "decoder", None), nn.Module) or not hasattr(vae, "config"):
        raise SnapcError(f"{type(vae).__name__} is not a diffusers AutoencoderKL (no decoder); "
                         "give the pipeline's vae")
    if len(example_inputs) != 1:
        raise SnapcError(f"the VAE decoder takes one input (latents), got "
                         f"{len(example_inputs)}; build it with decoder_example_inputs")
    info = source or ModelInfo(name=f"{type(vae).__name__}/vae_decoder", random_weights=False)
    return trace(LatentDecoder(vae).eval(), example_inputs, info, input_names=[DECODER_INPUT])


def decoder_summary(graph: Graph) -> dict[str, Any]:
    """Return the block counts and params of a traced decoder (for manifests and reports)."""
    return {"blocks": graph.blocks.counts(), "params": graph.param_count()}
