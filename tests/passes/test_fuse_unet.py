"""Fusions on real diffusers UNets: classic AttnProcessor and AttnProcessor2_0 exports."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from snapc.frontend import trace
from snapc.graph import Graph
from snapc.models import load_model
from snapc.numerics import verify
from snapc.passes.fuse import fusion_passes
from snapc.pipeline import PassContext, Pipeline

MINI_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16],
    "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"], "cross_attention_dim": 8,
    "attention_head_dim": 2, "norm_num_groups": 4,
}


def _unet(classic: bool, config: dict = MINI_UNET) -> Graph:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    if classic:
        unet.set_attn_processor(AttnProcessor())
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500.0]),
              torch.randn(1, 5, 8, generator=gen))
    return trace(unet, inputs)


@pytest.mark.parametrize("classic", [True, False], ids=["AttnProcessor", "AttnProcessor2_0"])
def test_mini_unet_counts(classic: bool) -> None:
    graph = _unet(classic)
    blocks = graph.blocks.counts().get("transformer", 0)  # down 1, mid 1, up 2
    result = Pipeline(fusion_passes("all")).run(graph, PassContext(check=False))
    counts = Counter(c.rule for c in result.changes)
    assert counts["fuse_attention"] == (2 * blocks if classic else 0)
    assert counts["fold_attention_heads"] == 2 * blocks
    assert counts["pack_qkv"] == blocks and counts["pack_kv"] == blocks
    assert counts["fuse_geglu"] == blocks
    assert counts["fuse_group_norm_silu"] > 0
    assert verify(graph, result.graph, graph.example_inputs).psnr_db >= 80


@pytest.mark.slow
def test_sd15_counts_classic_processor() -> None:
    """SD-1.5 (meta weights: structure only): 16 transformer blocks -> 32 fused attentions,
    32 folded to (B, S, D) attention, 16 packed QKV, 16 packed KV, 16 GEGLU."""
    from diffusers.models.attention_processor import AttnProcessor

    loaded = load_model("sd15", device="meta")
    loaded.module.set_attn_processor(AttnProcessor())
    graph = trace(loaded.module, loaded.example_inputs, loaded.info)
    result = Pipeline(fusion_passes("all")).run(graph, PassContext(check=False))
    counts = Counter(c.rule for c in result.changes)
    assert graph.blocks.counts()["transformer"] == 16
    assert counts["fuse_attention"] == 32 and counts["fold_attention_heads"] == 32
    assert counts["pack_qkv"] == 16 and counts["pack_kv"] == 16 and counts["fuse_geglu"] == 16
