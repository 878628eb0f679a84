"""Calibration inputs: batches of (latent, timestep, text states) a UNet sees while sampling."""

from __future__ import annotations

import torch

from snapc.graph import Graph

__all__ = ["calibration_inputs"]


def calibration_inputs(graph: Graph, n: int = 8, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``n`` calibration triples batched along dim 0.

    For the trained ``shapes`` model these are noised training images with their captions'
    text states (snapc.quality.calibration_triples). For other models (random weights, user
    UNets without a text encoder) they are seeded Gaussian latents and text states of the
    graph's shapes with timesteps spread evenly over [0, 1000).
    """
    if n < 1:
        raise ValueError("need at least one calibration triple")
    if graph.source.name == "shapes":
        from snapc.quality import calibration_triples

        triples = calibration_triples(n, seed)
        return tuple(torch.cat([t[i] for t in triples]) for i in range(3))  # type: ignore[return-value]
    sample, _, context = graph.example_inputs[:3]
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *sample.shape[1:]), generator=gen)
    timesteps = (torch.arange(n, dtype=torch.float32) + 0.5) * (1000.0 / n)
    texts = torch.randn((n, *context.shape[1:]), generator=gen)
    return latents, timesteps, texts
