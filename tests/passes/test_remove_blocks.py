"""RemoveBlocks against an independent reference: the diffusers module edited by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from snapc.errors import SnapcError, UnknownNameError
from snapc.models import load_model
from snapc.numerics import compare
from snapc.passes import RemoveBlocks
from snapc.pipeline import PassContext, Pipeline


class _Identity(nn.Module):
    """Stands in for a transformer block: returns the hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


class _ShortcutOnly(nn.Module):
    """Stands in for a ResNet block: only its shortcut path."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x, temb=None, *args, **kwargs):
        shortcut = self.resnet.conv_shortcut
        y = shortcut(x) if shortcut is not None else x
        return y / self.resnet.output_scale_factor


def _hand_edited(module: nn.Module, names: list[str]) -> nn.Module:
    edited = copy.deepcopy(module)
    for name in names:
        parent_name, _, index = name.rpartition(".")
        parent = edited.get_submodule(parent_name)
        block = parent[int(index)]
        parent[int(index)] = _Identity() if ".attentions." in name else _ShortcutOnly(block)
    return edited.eval()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


CASES = [
    ["down_blocks.0.attentions.1"],
    ["up_blocks.0.resnets.0"],  # channel-changing up-stage ResNet (conv_shortcut)
    ["mid_block.resnets.0", "mid_block.attentions.0"],
    ["down_blocks.0.resnets.0", "up_blocks.1.attentions.2", "up_blocks.1.resnets.1"],
]


@pytest.mark.parametrize("names", CASES, ids=lambda n: "+".join(n))
def test_removal_equals_hand_edited_module(tiny_graph, tiny, names):
    result = Pipeline([RemoveBlocks(names)]).run(tiny_graph, PassContext(check=True))
    graph = result.graph
    with torch.no_grad():
        expected = _hand_edited(tiny.module, names)(*tiny.example_inputs, return_dict=False)[0]
    numerics = compare(expected, graph.run())
    assert numerics.psnr_db >= 120, numerics
    assert graph.param_count() < tiny_graph.param_count()
    assert len(graph.fx.nodes) < len(tiny_graph.fx.nodes)
    assert all(name not in graph.blocks for name in names)
    assert set(graph.removed) == set(names)
    assert [c.target for c in result.changes] == names
    # the input graph is untouched
    assert tiny_graph.removed == () and len(tiny_graph.blocks) == 18


def _nodes_inside(graph, block: str) -> list[str]:
    return [n.name for n in graph.fx.nodes
            if any(f".{block}." in f".{path}."
                   for path, _ in n.meta.get("nn_module_stack", {}).values())]


@pytest.mark.parametrize("name", ["mid_block.attentions.0", "up_blocks.1.resnets.0"])  # 2nd:
# a ResNet that changes channels keeps its shortcut conv
def test_no_node_of_a_removed_block_is_left_to_run(tiny_graph, name):
    # export's metadata asserts and eval-mode dropout/SDPA count as impure for FX's own DCE:
    # without snapc's, most of a bypassed transformer block stayed in the program and ran
    assert _nodes_inside(tiny_graph, name)
    graph = RemoveBlocks([name]).run(tiny_graph, PassContext()).graph
    assert _nodes_inside(graph, name) == _nodes_inside(graph, f"{name}.conv_shortcut")


def test_removal_changes_the_output(tiny_graph):
    graph = RemoveBlocks(["mid_block.attentions.0"]).run(tiny_graph, PassContext()).graph
    assert compare(tiny_graph.run(), graph.run()).psnr_db < 60


def test_rules_and_records(tiny_graph):
    result = RemoveBlocks(["up_blocks.0.resnets.0", "down_blocks.0.resnets.1",
                           "down_blocks.0.attentions.0"]).run(tiny_graph, PassContext())
    rules = {c.target: c.rule for c in result.changes}
    assert rules == {"up_blocks.0.resnets.0": "resnet_to_shortcut",
                     "down_blocks.0.resnets.1": "resnet_to_identity",
                     "down_blocks.0.attentions.0": "transformer_to_identity"}
    assert result.modified and all(c.detail["macs"] > 0 for c in result.changes)


def test_second_run_changes_nothing(tiny_graph):
    once = RemoveBlocks(["down_blocks.0.attentions.0"]).run(tiny_graph, PassContext())
    twice = RemoveBlocks(["down_blocks.0.attentions.0"]).run(once.graph, PassContext())
    assert not twice.modified and twice.graph is once.graph


def test_result_re_exports(tiny_graph):
    graph = RemoveBlocks(["up_blocks.1.attentions.0"]).run(tiny_graph, PassContext()).graph
    again = torch.export.export(graph.module(), graph.example_inputs, strict=False)
    assert len(again.graph.nodes) == len(graph.fx.nodes)


def test_unknown_block_is_a_clear_error(tiny_graph):
    with pytest.raises(UnknownNameError, match="unknown block 'down_blocks.9.resnets.0'"):
        RemoveBlocks(["down_blocks.9.resnets.0"]).run(tiny_graph, PassContext())


def test_pipeline_wraps_errors_with_history(tiny_graph):
    pipeline = Pipeline([RemoveBlocks(["mid_block.attentions.0"]), RemoveBlocks(["nope"])])
    with pytest.raises(SnapcError, match=r"pass 'remove_blocks' failed: .*after passes: "
                                         r"remove_blocks"):
        pipeline.run(tiny_graph)


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_removals_match_reference_and_shrink(tiny_graph, tiny, data):
    names = data.draw(st.lists(st.sampled_from([b.name for b in tiny_graph.blocks]),
                               min_size=1, max_size=5, unique=True))
    graph = RemoveBlocks(names).run(tiny_graph, PassContext()).graph
    graph.validate()
    with torch.no_grad():
        expected = _hand_edited(tiny.module, names)(*tiny.example_inputs, return_dict=False)[0]
    assert compare(expected, graph.run()).psnr_db >= 120
    assert len(graph.fx.nodes) < len(tiny_graph.fx.nodes)
