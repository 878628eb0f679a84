"""SearchBlocks: budgets, pins, impossible budgets, re-scoring, and the proxy's correctness."""

from __future__ import annotations

import json

import pytest

from snapc.calibration import calibration_inputs
from snapc.cost import CostModel
from snapc.errors import BudgetError, UnknownNameError
from snapc.numerics import compare
from snapc.passes import RemoveBlocks, SearchBlocks
from snapc.passes.search import nmse, search_blocks
from snapc.pipeline import PassContext


@pytest.fixture(scope="module")
def phone() -> CostModel:
    return CostModel("iphone14pro-ane", dtype="fp16")


def _free_metric(removed: frozenset[str]) -> float:
    """Every block costs 0.01 quality per block, whatever it is."""
    return 0.01 * len(removed)


def test_budget_met_and_pins_respected(tiny_graph, phone):
    keep = ("mid_block.attentions.0", "down_blocks.0.attentions.0")
    record = search_blocks(tiny_graph, phone, budget=0.5, keep=keep, metric=_free_metric)
    assert record["final_ms"] <= 0.5 * record["original_ms"] + 1e-9
    assert record["stop"] == "budget met"
    assert not set(keep) & set(record["chosen"])
    assert [s["chosen"] for s in record["front"][1:]] == record["chosen"]
    latencies = [s["latency_ms"] for s in record["front"]]
    assert latencies == sorted(latencies, reverse=True)


def test_equal_quality_prefers_bigger_savings(tiny_graph, phone):
    record = search_blocks(tiny_graph, phone, budget=0.9, metric=_free_metric)
    savings = {row["name"]: row["saving_ms"] for row in record["blocks"]}
    first = record["chosen"][0]
    assert savings[first] == max(savings.values())


def test_impossible_budget_reports_best_reachable(tiny_graph, phone):
    with pytest.raises(BudgetError, match=r"out of reach: removing all 17 allowed blocks "
                                          r"gives [0-9.]+ ms"):
        search_blocks(tiny_graph, phone, budget_ms=0.001, keep=["mid_block.resnets.0"],
                      metric=_free_metric)


def test_unknown_pinned_block(tiny_graph, phone):
    with pytest.raises(UnknownNameError):
        search_blocks(tiny_graph, phone, budget=0.5, keep=["nope.0"], metric=_free_metric)


def test_quality_floor_stops_before_crossing(tiny_graph, phone):
    with pytest.raises(BudgetError, match="quality floor"):
        search_blocks(tiny_graph, phone, budget=0.2, metric=_free_metric, quality_floor=0.025)


def test_rescoring_differs_from_scoring_once_when_blocks_interact(tiny_graph, phone):
    a, b = "up_blocks.1.attentions.2", "up_blocks.1.attentions.1"

    def interacting(removed: frozenset[str]) -> float:
        """a and b are each nearly free alone, but together they break the model."""
        loss = 0.05 * len(removed - {a, b}) + 0.001 * len(removed & {a, b})
        return loss + (10.0 if {a, b} <= removed else 0.0)

    once = search_blocks(tiny_graph, phone, budget=0.75, metric=interacting, rescore=False)
    again = search_blocks(tiny_graph, phone, budget=0.75, metric=interacting, rescore=True)
    assert {a, b} <= set(once["chosen"])
    assert not {a, b} <= set(again["chosen"])
    assert again["front"][-1]["quality_loss"] < once["front"][-1]["quality_loss"]


def test_proxy_search_matches_real_removals(tiny_graph, phone):
    """The cached, downstream-only scoring equals exporting and running each step's graph."""
    budget = phone.estimate_graph(tiny_graph).total_ms * 0.9
    result = SearchBlocks(budget_ms=budget, device="iphone14pro-ane", calibration=2).run(
        tiny_graph, PassContext())
    record = result.info["search"]
    assert record["stop"] == "budget met" and len(record["chosen"]) >= 1
    inputs = calibration_inputs(tiny_graph, 2)
    wide = tiny_graph.at_batch(inputs)
    reference = wide.run(*inputs)
    for step in record["front"][1:]:
        graph = RemoveBlocks(step["removed"]).run(wide, PassContext()).graph
        graph.validate()
        assert nmse(reference, graph.run(*inputs)) == pytest.approx(step["quality_loss"],
                                                                     rel=1e-6, abs=1e-12)
    assert result.graph.removed == tuple(record["chosen"])
    assert [c.target for c in result.changes] == record["chosen"]
    assert all(c.cost_delta < 0 for c in result.changes)
    assert compare(tiny_graph.run(), result.graph.run()).psnr_db < 200
    json.dumps(record)  # the record goes into manifests as it is
