"""Screening candidates: random removed sets meet the latency budget and differ by seed."""

from __future__ import annotations

from snapc.cost import CostModel
from snapc.train.screening import predicted_latency, random_sets


def test_random_sets_meet_the_budget_and_differ(tiny_graph):
    cost = CostModel("iphone14pro-ane", dtype="fp16")
    original = cost.estimate_graph(tiny_graph).total_ms
    target = 0.7 * original
    keep = ["mid_block.attentions.0"]
    sets = random_sets(tiny_graph, cost, target, [0, 1, 2], keep=keep)
    assert len(sets) == 3 and len({s.removed for s in sets}) == 3
    for s in sets:
        assert s.latency_ms <= target
        assert abs(predicted_latency(tiny_graph, cost, s.removed) - s.latency_ms) < 1e-9
        assert keep[0] not in s.removed
        # the smallest prefix that fits: without its last block the set misses the budget
        assert predicted_latency(tiny_graph, cost, s.removed[:-1]) > target
    assert [s.removed for s in random_sets(tiny_graph, cost, target, [0, 1, 2], keep=keep)] \
        == [s.removed for s in sets]
