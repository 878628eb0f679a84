"""Call a Graph like a UNet at any batch size: (sample, timestep, text states) -> noise."""

from __future__ import annotations

import torch

from snapc.graph import Graph

__all__ = ["GraphFunction"]


class GraphFunction:
    """A callable over a Graph that re-traces it for each new input shape or device.

    Exported graphs have static shapes, so a sampler calling with batch 2N (classifier-free
    guidance) gets a graph traced for that batch, with the same blocks removed; graphs are
    cached per (shapes, device).
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._modules: dict[tuple, torch.nn.Module] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Return the graph's output for ``inputs``."""
        key = (tuple(tuple(t.shape) for t in inputs), inputs[0].device)
        if key not in self._modules:
            self._modules[key] = self.graph.at_batch(tuple(inputs)).module()
        with torch.no_grad():
            return self._modules[key](*inputs)
