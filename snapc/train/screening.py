"""Recovery-aware choice of the removed set: score candidate sets by a short recovery.

Quality as removed does not predict quality after recovery (on ``shapes`` at budget 0.5 a set
at 0.011 adherence as removed recovered to 0.920 and one at 0.072 to 0.939; at budget 0.3 the
search's pick recovered to 0.482 and a random set to 0.853). What a set becomes after recovery
is measured most directly by recovering it: each candidate set (the block search's pick plus
seeded random sets that meet the same latency budget) is recovered for a short time, scored,
and the best one is recovered in full, starting from its screened weights.

The score is the full metric where there is one (1 - prompt adherence on ``shapes``-family
models, a fixed set of validation-style prompts and few DDIM steps) and otherwise the
recovery loss on a batch the training never draws (the distillation gap to the teacher).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from snapc.graph import Graph

__all__ = ["Candidate", "predicted_latency", "random_sets", "adherence_score", "heldout_loss_score"]


@dataclass(frozen=True)
class Candidate:
    """A removed set to screen: where it came from and its predicted latency."""

    origin: str  # "search" or "random-<seed>"
    removed: tuple[str, ...]
    latency_ms: float

    def to_json(self) -> dict:
        """Return the candidate as a JSON-ready dict."""
        return {"origin": self.origin, "removed": list(self.removed),
                "latency_ms": round(self.latency_ms, 4)}


def predicted_latency(graph: Graph, cost, removed: Sequence[str]) -> float:
    """Return the predicted latency (ms) of ``graph`` without ``removed`` on cost's device."""
    from snapc.passes import remove_blocks

    pruned, _ = remove_blocks(graph, removed)
    return cost.estimate_graph(pruned).total_ms


def random_sets(graph: Graph, cost, target_ms: float, seeds: Sequence[int],
                keep: Sequence[str] = ()) -> list[Candidate]:
    """Return one random removed set per seed that meets ``target_ms`` on ``cost``'s device.

    Each set takes blocks in a random order until the predicted latency is within the target
    (the smallest prefix that fits), so sets differ in what they remove, not in how far past
    the budget they go. Per-block savings pick the prefix; the pruned graph's own estimate
    confirms it (one export per set, more only where savings do not add up exactly).
    """
    names = [b.name for b in graph.blocks if b.removable and b.name not in set(keep)]
    saving = {name: cost.saving_ms(graph, graph.blocks[name]) for name in names}
    original = cost.estimate_graph(graph).total_ms
    out = []
    for i, seed in enumerate(seeds):
        order = names[:]
        random.Random(seed).shuffle(order)
        total, k = 0.0, 0
        while k < len(order) and original - total > target_ms:
            total += saving[order[k]] or 0.0
            k += 1
        while k > 1 and predicted_latency(graph, cost, order[:k - 1]) <= target_ms:
            k -= 1  # savings over-estimated: a shorter prefix fits
        while k <= len(order):
            ms = predicted_latency(graph, cost, order[:k])
            if ms <= target_ms:
                out.append(Candidate(f"random-{i}", tuple(order[:k]), ms))
                break
            k += 1
    return out


def adherence_score(prompts: int = 100, steps: int = 10, guidance: float = 3.0,
                    seed: int = 321) -> Callable[[nn.Module, torch.device], float]:
    """Return ``score(unet, device) -> 1 - prompt adherence`` for shapes-family UNets.

    Prompts are validation-style prompts drawn with a seed of their own (not the evaluation
    protocol's), sampled with DDIM and CFG.
    """
    from snapc.quality import generate, prompt_adherence, validation_codes
    from snapc.shapes.model import load_text_encoder

    codes = validation_codes(prompts, seed=seed)

    def score(unet: nn.Module, device: torch.device) -> float:
        text = load_text_encoder().to(device)
        images = generate(unet.eval(), text, codes, steps=steps, guidance=guidance,
                          device=device, seed=seed, batch=prompts)
        return 1.0 - prompt_adherence(images, codes)["adherence"]

    return score


def heldout_loss_score(method_loss: Callable[[nn.Module, dict], tuple[torch.Tensor, dict]],
                       batches: Sequence[dict]) -> Callable[[nn.Module, torch.device], float]:
    """Return ``score(unet, device)``: the mean distillation loss on held-out batches."""

    def score(unet: nn.Module, device: torch.device) -> float:
        with torch.no_grad():
            return float(sum(method_loss(unet.eval(), b)[0].item() for b in batches)
                         / len(batches))

    return score
