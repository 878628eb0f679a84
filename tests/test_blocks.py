"""Frontend and block map: counts, shapes, MACs and dataflow on tiny, sd15 and sd21-base."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from snapc.blocks import RESNET, TRANSFORMER, classify_module_type
from snapc.compiler import load_graph
from snapc.frontend import trace


def test_tiny_block_map_counts_and_shapes(tiny_graph):
    blocks = tiny_graph.blocks
    assert blocks.counts() == {RESNET: 12, TRANSFORMER: 6}
    attn = blocks["down_blocks.0.attentions.0"]
    assert (attn.kind, attn.stage, attn.resolution) == (TRANSFORMER, "down.0", (16, 16))
    assert (attn.seq_len, attn.context_len, attn.context_dim) == (256, 16, 32)
    up = blocks["up_blocks.0.resnets.0"]
    assert (up.in_channels, up.out_channels) == (128, 64)  # concat of skip and hidden
    assert up.shortcut is not None and up.removable
    assert blocks["mid_block.resnets.0"].stage == "mid"
    assert all(b.nodes and b.exit in b.nodes for b in blocks)


def test_tiny_block_params_and_macs_add_up(tiny_graph):
    macs = tiny_graph.macs_by_class()
    blocks = list(tiny_graph.blocks)
    assert sum(b.params for b in blocks) < tiny_graph.param_count()
    assert sum(b.macs for b in blocks) < sum(macs.values())
    attn = tiny_graph.blocks["mid_block.attentions.0"]
    # 8x8 latent, 64 channels, head dim 8: self QK^T+AV = 2*64*64*64, cross = 2*64*16*64
    assert attn.attention_macs == 2 * 64 * 64 * 64 + 2 * 64 * 16 * 64


def test_tiny_dataflow_is_a_dag_from_input_to_output(tiny_graph):
    flow = tiny_graph.blocks.dataflow
    assert nx.is_directed_acyclic_graph(flow)
    assert nx.has_path(flow, "input", "output")
    # the skip connection: the first down transformer feeds an up-stage ResNet directly
    assert flow.has_edge("down_blocks.0.attentions.0", "up_blocks.1.resnets.1")
    order = list(nx.topological_sort(flow))
    assert order.index("down_blocks.0.resnets.0") < order.index("mid_block.attentions.0")


def test_sd15_matches_public_figures_on_meta_device():
    graph = load_graph("sd15", device="meta")
    assert graph.param_count() == 859_520_964
    assert graph.blocks.counts() == {RESNET: 22, TRANSFORMER: 16}
    macs = graph.macs_by_class()
    assert round(sum(macs.values()) / 1e9, 1) == 401.6
    assert round((macs["conv"] + macs["linear"]) / 1e9, 1) == 338.6
    stages = [b.stage for b in graph.blocks.of_kind(TRANSFORMER)]
    assert stages.count("down.0") == 2 and stages.count("mid") == 1 and stages.count("up.3") == 3


def test_sd21_base_uses_linear_projections_and_1024_context():
    graph = load_graph("sd21-base", device="meta")
    attn = graph.blocks["down_blocks.0.attentions.0"]
    assert attn.context_dim == 1024 and attn.context_len == 77
    assert graph.blocks.counts() == {RESNET: 22, TRANSFORMER: 16}


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.res = _ResBlock(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.res(self.stem(x)))


def test_any_module_traces_and_reports_what_it_did_not_cover():
    net = _Net()
    graph = trace(net, (torch.randn(1, 3, 8, 8),))
    assert [b.name for b in graph.blocks] == ["res"]
    assert graph.blocks["res"].kind == RESNET
    assert set(graph.blocks.uncovered) == {"stem", "head"}
    with torch.no_grad():
        torch.testing.assert_close(graph.run(), net(graph.example_inputs[0]))


@pytest.mark.parametrize("type_name,kind", [
    ("diffusers.models.resnet.ResnetBlock2D", RESNET),
    ("diffusers.models.transformers.transformer_2d.Transformer2DModel", TRANSFORMER),
    ("diffusers.models.unets.unet_2d_blocks.CrossAttnDownBlock2D", None),
    ("diffusers.models.unets.unet_2d_blocks.UNetMidBlock2DCrossAttn", None),
    ("mymodels.SpatialTransformer", TRANSFORMER),
    ("mymodels.ResBlock", RESNET),
    ("torch.nn.modules.conv.Conv2d", None),
])
def test_classify_module_type(type_name, kind):
    assert classify_module_type(type_name) == kind
