"""Weights that a model only transposes are stored transposed, once, at import."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'snapc[tvm]'")

from snapc.frontend import trace  # noqa: E402
from snapc.graph import ModelInfo  # noqa: E402
from snapc.targets.tvm_build import import_graph  # noqa: E402


class Tied(torch.nn.Module):
    """One Linear; an embedding-like weight used both transposed and as it is; a matrix
    multiplied untransposed."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 6)
        self.tied = torch.nn.Parameter(torch.randn(6, 6))
        self.plain = torch.nn.Parameter(torch.randn(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return (y @ self.tied.t() + y @ self.tied) @ self.plain


def test_only_weights_used_by_one_transpose_are_stored_transposed() -> None:
    torch.manual_seed(0)
    net = Tied().eval()
    graph = trace(net, (torch.randn(3, 8),), ModelInfo(name="tied", random_weights=True))
    imported = import_graph(graph.program)
    params = dict(zip(imported.param_names, imported.params, strict=True))
    assert imported.transposed == ["p_net_proj_weight"]
    np.testing.assert_array_equal(params["p_net_proj_weight"], net.proj.weight.detach().T)
    np.testing.assert_array_equal(params["p_net_tied"], net.tied.detach())
    np.testing.assert_array_equal(params["p_net_plain"], net.plain.detach())
    script = imported.module["main"].script()
    assert script.count("R.permute_dims") == 1  # the tied weight's transpose stays
    declared = {p.name: tuple(int(d) for d in p.ty.shape)
                for p in imported.module["main"].params}
    assert declared["p_net_proj_weight"] == (8, 6)
