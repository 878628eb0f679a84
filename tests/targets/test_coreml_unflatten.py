"""The Core ML trace frontend runs the program unflattened back into its module tree; after the
Neural Engine legalization (q/k/v packing, the split-einsum layout) that tree must still
compute the graph, for each pipeline component (the decoder's mid-block attention and CLIP's
attention were routed wrongly once new nodes lost their module)."""

from __future__ import annotations

import pytest
import torch

from snapc.clip_text import tokenize, trace_text_encoder
from snapc.pipeline import PassContext, Pipeline
from snapc.pipeline_models import load_text_encoder, load_vae
from snapc.targets.coreml import CoreMLOptions, _unflattened, pipeline
from snapc.vae import decoder_example_inputs, trace_decoder


def _decoder():
    vae, _ = load_vae("tiny-pipeline")
    return trace_decoder(vae, decoder_example_inputs(vae, 1, 16, 0))


def _text_encoder():
    parts = load_text_encoder("tiny-pipeline")
    return trace_text_encoder(parts.module, tokenize(parts.tokenizer, ["a red cat"], 16))


def _unet():
    from snapc.compiler import load_graph

    return load_graph("tiny")


@pytest.mark.parametrize("make", [_decoder, _text_encoder, _unet],
                         ids=["vae_decoder", "text_encoder", "unet"])
def test_unflattened_legalized_program_computes_the_graph(make):
    graph = Pipeline(pipeline(CoreMLOptions())).run(make(), PassContext()).graph
    module = _unflattened(graph)  # as the trace frontend runs it
    with torch.no_grad():
        out = module(*graph.example_inputs)
    torch.testing.assert_close(out, graph.example_output, atol=1e-5, rtol=0)
