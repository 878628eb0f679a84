"""Call a Graph, or a compiled ONNX or TVM x86 model, at any batch size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from snapc.graph import Graph

__all__ = ["GraphFunction", "OnnxFunction", "TvmFunction"]


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


class _FixedBatch:
    """Calls a compiled model at its fixed batch: calls at any batch become calls at
    ``batch``, the last chunk padded by repeating its final row (the models snapc compiles
    treat batch rows independently, so padding changes no real row). Returns the first
    output, on the first input's device. Subclasses run one batch of numpy arrays."""

    batch: int

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Return the first output for the N rows of ``inputs``, in chunks of the batch."""
        outs = []
        for lo in range(0, inputs[0].shape[0], self.batch):
            rows = [t[lo : lo + self.batch].cpu() for t in inputs]
            real = rows[0].shape[0]
            if real < self.batch:
                rows = [torch.cat([r, r[-1:].expand(self.batch - real, *r.shape[1:])])
                        for r in rows]
            out = self._run([r.contiguous().numpy() for r in rows])
            outs.append(torch.from_numpy(np.ascontiguousarray(out[:real])))
        return torch.cat(outs).to(inputs[0].device)


class OnnxFunction(_FixedBatch):
    """An ONNX model on onnxruntime (CPU) called at its fixed batch (see ``_FixedBatch``)."""

    def __init__(self, path: Path, names: Sequence[str], batch: int) -> None:
        import onnxruntime as ort

        from snapc.targets.onnx_session import session_options

        # the session config the artifact records, which the ONNX target verified it under
        # (weight-only int8 MatMuls computed in fp32: targets/onnx_session.py)
        options = session_options(path)
        # No busy-waiting between runs: snapc calls a session from a sampling loop with torch
        # work (text encoder, DDIM arithmetic, other sessions) in between, and spinning pool
        # threads take those cores (measured on this 2-core machine under load: 62 ms per
        # shapes-fast UNet call without spinning, 101 ms with it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.names, self.batch = tuple(names), batch

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        feeds = dict(zip(self.names, arrays, strict=True))
        return self.session.run(None, feeds)[0]


class TvmFunction(_FixedBatch):
    """A TVM x86 artifact (``model.so`` + ``params.safetensors``, snapc.targets.tvm) on this
    CPU through TVM's Relax VM, called at its fixed batch (see ``_FixedBatch``).

    ``param_order`` is the artifact manifest's ``extra.tvm.param_order``: the weights follow
    the inputs in that order; ``entry`` is the VM function (``extra.tvm.entry``).
    """

    def __init__(self, library: Path, params: Path, param_order: Sequence[str], batch: int,
                 entry: str = "main") -> None:
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        self.device = tvm.cpu(0)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        weights = load_file(str(params))
        self.weights = [tvm.runtime.tensor(weights[n], self.device) for n in param_order]
        self.entry, self.batch = entry, batch

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        import tvm

        args = [tvm.runtime.tensor(a, self.device) for a in arrays]
        return self.vm[self.entry](*args, *self.weights).numpy()
