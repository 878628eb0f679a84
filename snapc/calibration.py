"""Calibration inputs: batches of (latent, timestep, text states) a UNet sees while sampling."""

from __future__ import annotations

import torch

from snapc.errors import SnapcError
from snapc.graph import Graph

__all__ = ["calibration_inputs", "shapes_caption_tokens", "alphas_cumprod_for", "x0_bound_for",
           "to_x0"]


def calibration_inputs(graph: Graph, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return ``n`` calibration triples batched along dim 0.

    For ``shapes``-family UNets (``shapes`` and the models derived from it) these are noised
    training images with their captions' text states (snapc.quality.calibration_triples), for
    ``shapes-latent``-family UNets the same scenes through its encoder; for
    a shapes-family text encoder (one ``input_ids`` input) the token ids of ``n`` training
    captions (:func:`shapes_caption_tokens`). For other models (random weights, user
    UNets without a text encoder) they are seeded Gaussian latents and text states of the
    graph's shapes with timesteps spread evenly over [0, 1000). A graph with more inputs (SDXL's
    ``text_embeds``, ``time_ids``) gets them after the triple: Gaussian pooled text embeds and
    the example's size / crop ids.
    """
    if n < 1:
        raise ValueError("need at least one calibration triple")
    if _shapes_family(graph):
        if tuple(graph.input_names) == ("input_ids",):  # the text encoder
            return (shapes_caption_tokens(n, seed),)
        from snapc.quality import calibration_triples

        triples = calibration_triples(n, seed)
        return tuple(torch.cat([t[i] for t in triples]) for i in range(3))  # type: ignore[return-value]
    if _latent_family(graph) and len(graph.example_inputs) == 3:
        from snapc.shapes_latent.family import calibration_triples as latent_triples

        return latent_triples(n, seed)
    if len(graph.example_inputs) < 3:
        raise SnapcError(f"no calibration set for a graph of inputs {', '.join(graph.input_names)}"
                         " (a text encoder?); give the Quantize pass its inputs, e.g. token ids "
                         "from snapc.clip_text.calibration_tokens")
    sample, _, context = graph.example_inputs[:3]
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *sample.shape[1:]), generator=gen)
    timesteps = (torch.arange(n, dtype=torch.float32) + 0.5) * (1000.0 / n)
    texts = torch.randn((n, *context.shape[1:]), generator=gen)
    extra = tuple(
        example[:1].repeat(n, *([1] * (example.dim() - 1))) if name == "time_ids"
        else torch.randn((n, *example.shape[1:]), generator=gen)
        for name, example in zip(graph.input_names[3:], graph.example_inputs[3:], strict=True))
    return (latents, timesteps, texts, *extra)


def _base(graph: Graph) -> str:
    return graph.source.base or graph.source.name


def _shapes_family(graph: Graph) -> bool:
    from snapc.families import is_shapes_family

    return is_shapes_family(_base(graph))


def _latent_family(graph: Graph) -> bool:
    from snapc.families import is_latent_family

    return is_latent_family(_base(graph))


def shapes_caption_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """Return the (n, MAX_TOKENS) token ids of n seeded training-split captions."""
    from snapc.shapes.data import caption, sample_codes
    from snapc.shapes.text import tokenize

    codes = sample_codes(n, split="train", generator=torch.Generator().manual_seed(seed))
    return tokenize([caption(int(c)) for c in codes])


def alphas_cumprod_for(graph: Graph) -> torch.Tensor:
    """Return the model's training noise schedule alpha_bar_t (t = 0..999).

    ``shapes`` and ``shapes-latent`` (and the models derived from them) use shapes' cosine
    schedule; Stable Diffusion models the scaled-linear schedule (beta 0.00085 to 0.012, 1000
    steps) they were trained with.
    """
    if _shapes_family(graph) or _latent_family(graph):
        from snapc.shapes.schedule import alphas_cumprod

        return alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def x0_bound_for(graph: Graph) -> float:
    """Return the bound x0 estimates are clipped to: the encoder's latent range for the
    shapes-latent family (as its sampler clips), else 1 (the pixel range)."""
    if _latent_family(graph):
        from snapc.shapes_latent.family import x0_bound

        return x0_bound()
    return 1.0


def to_x0(eps: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
          alphas_cumprod: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """Return the clipped x0 prediction (x_t - sqrt(1 - a) eps) / sqrt(a), clamped to
    [-bound, bound].

    Errors in eps matter in proportion to sqrt((1 - a) / a) once a sampler turns them into an
    image; comparing in x0 space weighs each timestep by that, as sampling does.
    """
    a = alphas_cumprod.to(eps.device)[timestep.long().clamp(0, len(alphas_cumprod) - 1)]
    a = a.view(-1, *([1] * (eps.dim() - 1)))
    return ((sample - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-bound, bound)
