"""Call a Graph, or a compiled ONNX model, at any batch size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from snapc.graph import Graph

__all__ = ["GraphFunction", "OnnxFunction"]


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


class OnnxFunction:
    """An ONNX model on onnxruntime (CPU) called at its fixed batch: calls at any batch become
    calls at ``batch``, the last chunk padded by repeating its final row (the models snapc
    compiles treat batch rows independently, so padding changes no real row). Returns the
    first output, on the first input's device.
    """

    def __init__(self, path: Path, names: Sequence[str], batch: int) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), ort.SessionOptions(),
                                            providers=["CPUExecutionProvider"])
        self.names, self.batch = tuple(names), batch

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Return the first output for the N rows of ``inputs``, in chunks of the batch."""
        outs = []
        for lo in range(0, inputs[0].shape[0], self.batch):
            rows = [t[lo : lo + self.batch].cpu() for t in inputs]
            real = rows[0].shape[0]
            if real < self.batch:
                rows = [torch.cat([r, r[-1:].expand(self.batch - real, *r.shape[1:])])
                        for r in rows]
            feeds = {name: r.contiguous().numpy() for name, r in
                     zip(self.names, rows, strict=True)}
            outs.append(torch.from_numpy(self.session.run(None, feeds)[0][:real]))
        return torch.cat(outs).to(inputs[0].device)
