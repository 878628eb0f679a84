"""Calibration sets: what each graph of a shapes-family model is calibrated on."""

from __future__ import annotations

import torch

from snapc import PassContext, Pipeline, trace
from snapc.calibration import alphas_cumprod_for, calibration_inputs, shapes_caption_tokens
from snapc.compiler import load_graph
from snapc.graph import ModelInfo
from snapc.passes import Quantize
from snapc.quality import calibration_triples
from snapc.shapes.model import load_text_encoder
from snapc.shapes.schedule import alphas_cumprod
from snapc.shapes.text import MAX_TOKENS, tokenize


def _text_encoder_graph(name: str):
    source = ModelInfo(name=f"{name}/text_encoder", random_weights=False, base="shapes")
    return trace(load_text_encoder().eval(), (tokenize(["a small red circle at the top"]),),
                 source, input_names=["input_ids"])


def test_derived_shapes_unet_calibrates_on_real_scenes_and_its_own_schedule():
    graph = load_graph("shapes-fast")  # name shapes-fast, base shapes
    got = calibration_inputs(graph, 4, seed=3)
    want = calibration_triples(4, 3)
    for i, tensor in enumerate(got):
        torch.testing.assert_close(tensor, torch.cat([t[i] for t in want]))
    torch.testing.assert_close(alphas_cumprod_for(graph), alphas_cumprod())


def test_text_encoder_calibrates_on_caption_tokens_and_quantizes_w8a8():
    graph = _text_encoder_graph("shapes-fast")
    (tokens,) = calibration_inputs(graph, 6, seed=1)
    assert tokens.shape == (6, MAX_TOKENS) and tokens.dtype == torch.long
    torch.testing.assert_close(tokens, shapes_caption_tokens(6, 1))
    assert (tokens > 0).any(dim=1).all()  # every row holds a caption, not padding alone
    result = Pipeline([Quantize("w8a8", calibration=4)]).run(graph, PassContext(verify=True))
    assert result.records[0].changes  # records written from the token calibration set
