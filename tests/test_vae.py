"""snapc.vae: the AutoencoderKL decoder traced to a Graph (latents in, image out) with its own
block map; UNet block maps keep their blocks; the offline CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from snapc.clip_text import PROMPT_WORDS, build_tokenizer, tokenize
from snapc.compiler import load_graph
from snapc.errors import SnapcError
from snapc.pipeline_models import TINY_VAE_CONFIG
from snapc.vae import decoder_example_inputs, trace_decoder, vae_scale


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(**{**TINY_VAE_CONFIG, "layers_per_block": 2}).eval()


def test_decoder_graph_equals_diffusers_decode(vae):
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    inputs = decoder_example_inputs(vae, 2, 8, seed=1)
    graph = trace_decoder(vae, inputs)
    want = vae.decode(inputs[0] / vae.config.scaling_factor).sample
    torch.testing.assert_close(graph.run(), want, rtol=1e-5, atol=1e-5)
    assert graph.input_names == ("latents",)
    assert graph.output_shape() == (2, 3, 8 * vae_scale(vae), 8 * vae_scale(vae))
    for key, value in vae.state_dict().items():  # the VAE is not edited
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_decoder_block_map_names_stages_and_params(vae):
    graph = trace_decoder(vae, decoder_example_inputs(vae, 1, 8))
    blocks = graph.blocks
    layers = TINY_VAE_CONFIG["block_out_channels"]
    expected = (["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
                + [f"up_blocks.{i}.resnets.{j}" for i in range(len(layers)) for j in range(3)])
    assert [b.name for b in blocks] == expected  # layers_per_block + 1 ResNets per up block
    assert blocks.counts() == {"resnet": 2 + 3 * len(layers), "transformer": 1}
    attention = blocks["mid_block.attentions.0"]
    assert attention.kind == "transformer" and attention.stage == "mid"
    assert attention.resolution == (8, 8) and attention.seq_len == 64
    assert attention.removable and attention.context_dim is None
    assert blocks["up_blocks.1.resnets.0"].stage == "up.1"
    assert blocks["up_blocks.1.resnets.0"].resolution == (16, 16)  # after the upsampler
    assert blocks["up_blocks.1.resnets.0"].out_channels == layers[0]
    params = dict(vae.decoder.named_parameters())
    for block in blocks:
        assert block.params == sum(p.numel() for n, p in params.items()
                                   if n.startswith(block.name + "."))
    assert "up_blocks.0.upsamplers" in blocks.uncovered and "conv_out" in blocks.uncovered


def test_decoder_blocks_can_be_removed(vae):
    from snapc.passes import remove_blocks

    graph = trace_decoder(vae, decoder_example_inputs(vae, 1, 8))
    removed, _ = remove_blocks(graph, ["mid_block.attentions.0", "up_blocks.0.resnets.2"])
    assert len(removed.blocks) == len(graph.blocks) - 2
    assert removed.run().shape == graph.run().shape


def test_unet_block_maps_are_unchanged():
    counts = load_graph("tiny", device="meta").blocks.counts()
    assert counts == {"resnet": 12, "transformer": 6}  # attention inside transformers only


def test_bad_decoder_inputs_are_errors(vae):
    with pytest.raises(SnapcError, match="not a diffusers AutoencoderKL"):
        trace_decoder(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    with pytest.raises(SnapcError, match="one input"):
        trace_decoder(vae, (torch.zeros(1, 4, 8, 8),) * 2)


def test_offline_tokenizer_spells_words_and_refuses_long_prompts():
    tokenizer = build_tokenizer(16)
    ids = tokenizer("a photo of a red cat riding a horse").input_ids
    assert len(ids) == 11  # start, 9 words, end
    assert tokenizer.convert_ids_to_tokens(ids)[1:3] == ["a</w>", "photo</w>"]
    assert len(tokenizer("zxqv").input_ids) > 3  # unknown words split, never fail
    tokens = tokenize(tokenizer, ["a red cat", ""], 16)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    assert all(len(tokenizer(w).input_ids) == 3 for w in PROMPT_WORDS)  # one token each
    assert build_tokenizer(16).get_vocab() == tokenizer.get_vocab()  # the same every time
    with pytest.raises(SnapcError, match="prompt 2 takes 19 tokens; the text encoder takes at "
                                         "most 16"):
        tokenize(tokenizer, ["a cat", " ".join(["cat"] * 17)], 16)
