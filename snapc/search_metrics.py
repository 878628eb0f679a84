"""Full quality metrics for block search on the trained `shapes` and `shapes-latent` models.

``AdherenceLoss`` samples images with a block set removed and returns 1 - prompt adherence:
the full metric (the analogue of SnapFusion's CLIP score), usable as ``SearchBlocks(metric=)``.
It samples through snapc.incremental.BypassEvaluator, so no removal is exported: one trace at
the sampling batch serves every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from snapc.graph import Graph
from snapc.incremental import BypassEvaluator

__all__ = ["AdherenceLoss", "full_metric"]


def full_metric(graph: Graph, prompts: int = 100, steps: int = 10, device: str = "cpu"):
    """Return the full metric for ``graph``'s family, or None where there is none: the
    shapes family's :class:`AdherenceLoss`, shapes-latent's
    :class:`snapc.shapes_latent.family.LatentAdherenceLoss` (its pictures decoded)."""
    from snapc.families import is_latent_family, is_shapes_family

    base = graph.source.base or graph.source.name
    if is_shapes_family(base):
        return AdherenceLoss(graph, prompts=prompts, steps=steps, device=device)
    if is_latent_family(base):
        from snapc.shapes_latent.family import LatentAdherenceLoss

        return LatentAdherenceLoss(graph, prompts=prompts, steps=steps, device=device)
    return None


class AdherenceLoss:
    """``metric(removed) -> 1 - prompt adherence`` of ``graph`` without ``removed``.

    Uses ``prompts`` validation-style prompts drawn with ``seed`` (pick a seed other than the
    evaluation protocol's so search and final scoring use different prompts), ``steps`` DDIM
    steps and CFG ``guidance``, on ``device``.
    """

    def __init__(self, graph: Graph, prompts: int = 100, steps: int = 10,
                 guidance: float = 3.0, device: str = "cpu", seed: int = 123) -> None:
        from snapc.quality import validation_codes
        from snapc.shapes.data import caption
        from snapc.shapes.model import encode_captions, load_text_encoder

        if graph.source.name != "shapes":
            raise ValueError("AdherenceLoss needs the trained 'shapes' model")
        self.codes = validation_codes(prompts, seed=seed)
        encoder = load_text_encoder()
        self.context = encode_captions([caption(int(c)) for c in self.codes], encoder).to(device)
        self.uncond = encode_captions([""], encoder).to(device)
        self.noise = torch.randn(prompts, 3, 32, 32,
                                 generator=torch.Generator().manual_seed(seed)).to(device)
        self.steps, self.guidance = steps, guidance
        batch = 2 * prompts  # conditional and unconditional halves in one batch
        example = (torch.zeros(batch, 3, 32, 32, device=device),
                   torch.zeros(batch, device=device),
                   torch.zeros(batch, *self.context.shape[1:], device=device))
        self.evaluator = BypassEvaluator(graph.at_batch(example), example, device=device)
        self.__name__ = f"adherence_loss_{prompts}p_{steps}s"

    def __call__(self, removed: Iterable[str]) -> float:
        """Return 1 - prompt adherence of images sampled with ``removed`` bypassed."""
        from snapc.quality import prompt_adherence
        from snapc.shapes.sampler import sample

        removed = frozenset(removed)

        def unet(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return self.evaluator.full(removed, (x, t, ctx))

        images = sample(unet, self.context, self.uncond, steps=self.steps,
                        guidance=self.guidance, noise=self.noise)
        return 1.0 - prompt_adherence(images.cpu(), self.codes)["adherence"]
