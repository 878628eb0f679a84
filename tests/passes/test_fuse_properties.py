"""Property tests: every fusion keeps random small UNet stages within fp32 tolerance.

Random configs vary channels, heads, head dims, linear vs 1x1-conv projections, sequence
length (spatial size) and the attention spelling. Each example runs the full fusion list and
the Core ML lowering and checks PSNR >= 80 dB vs the unfused graph, change counts per
transformer stage, idempotence and that no pass edits its input.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapc.frontend import trace
from snapc.numerics import verify
from snapc.passes.fuse import fusion_passes, lowering_passes
from snapc.pipeline import PassContext, Pipeline
from tests.passes.fusion_models import FORMS, MiniUNetBlock, mini_inputs

MIN_PSNR_DB = 80.0

configs = st.fixed_dictionaries({
    "groups": st.sampled_from([2, 4]),
    "channel_mult": st.integers(2, 6),
    "heads": st.integers(1, 4),
    "head_dim": st.sampled_from([4, 8, 12]),
    "context_dim": st.sampled_from([6, 16]),
    "context_len": st.integers(1, 9),
    "size": st.integers(2, 7),
    "form": st.sampled_from(FORMS),
    "linear_projection": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_fusions_keep_outputs(cfg: dict) -> None:
    channels = cfg["groups"] * cfg["channel_mult"]
    torch.manual_seed(cfg["seed"])
    block = MiniUNetBlock(channels, cfg["heads"], cfg["head_dim"], cfg["context_dim"],
                          form=cfg["form"], linear_projection=cfg["linear_projection"],
                          groups=cfg["groups"]).eval()
    inputs = mini_inputs(channels, cfg["size"], cfg["context_len"], cfg["context_dim"],
                         cfg["seed"])
    graph = trace(block, inputs)
    code = graph.program.graph_module.code
    quick = PassContext(check=False)  # per-pass numerics are test_fuse.py's job; final here
    result = Pipeline(fusion_passes("all")).run(graph, quick)
    assert graph.program.graph_module.code == code
    assert verify(graph, result.graph, inputs).psnr_db >= MIN_PSNR_DB
    counts = Counter(c.rule for c in result.changes)
    assert counts["fuse_attention"] == (0 if cfg["form"] == "sdpa" else 2)
    assert counts["fold_attention_heads"] == 2
    assert counts["pack_qkv"] == 1 and counts["pack_kv"] == 1
    assert counts["fuse_group_norm_silu"] == 1 and counts["fuse_geglu"] == 1
    again = Pipeline(fusion_passes("all")).run(result.graph, quick)
    assert again.changes == ()
    lowered = Pipeline(lowering_passes("coreml")).run(result.graph, quick).graph
    assert verify(graph, lowered, inputs).psnr_db >= MIN_PSNR_DB
