"""The shipped shapes model: loading, sampling on CPU, example inputs, by-hand block removal."""

import time

import pytest
import torch

from snapc.shapes.model import (
    UNET_CONFIG,
    encode_captions,
    example_inputs,
    load_text_encoder,
    load_unet,
    removable_blocks,
    without_block,
)
from snapc.shapes.sampler import ddim_timesteps, sample


@pytest.fixture(scope="module")
def unet():
    return load_unet()


@pytest.fixture(scope="module")
def text():
    return load_text_encoder()


def test_shipped_model_samples_two_images_in_seconds(unet, text):
    context = encode_captions(["a large red square at the top left", "a small blue cross at the "
                               "bottom right"], text)
    start = time.perf_counter()
    images = sample(unet, context, encode_captions([""], text), steps=4, guidance=3.0,
                    generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - start < 120  # ~1 s of compute; the bound allows a loaded CI box
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    assert not torch.allclose(images[0], images[1])


def test_weights_are_trained_not_random(unet):
    assert not unet.training and all(not p.requires_grad for p in unet.parameters())
    assert list(unet.config.block_out_channels) == UNET_CONFIG["block_out_channels"]
    # A trained epsilon predictor recovers the noise it is given at high noise levels.
    x, t, context = example_inputs(2)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps = unet(noise, torch.full((2,), 990.0), context).sample
    assert torch.nn.functional.mse_loss(eps, noise) < 0.05


def test_example_inputs_shapes():
    sample_, timestep, context = example_inputs(3)
    assert sample_.shape == (3, 3, 32, 32) and sample_.dtype == torch.float32
    assert timestep.shape == (3,) and timestep.dtype == torch.float32
    assert context.shape == (3, 20, 128) and context.dtype == torch.float32
    assert torch.equal(example_inputs(3)[2], context)


def test_ddim_timesteps():
    assert ddim_timesteps(4) == [999, 666, 333, 0]
    assert ddim_timesteps(1) == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def test_removable_blocks_cover_every_kind(unet):
    names = removable_blocks(unet)
    assert len(names) == 28 and len(set(names)) == 28
    assert sum(".attentions." in n for n in names) == 11
    assert "mid_block.attentions.0" in names and "up_blocks.2.resnets.2" in names


def test_without_block_changes_only_the_copy(unet):
    inputs = example_inputs(1)
    with torch.no_grad():
        before = unet(*inputs).sample
        edited = without_block(unet, "down_blocks.2.attentions.1")
        after = edited(*inputs).sample
        again = unet(*inputs).sample
    assert torch.equal(before, again)
    assert not torch.allclose(before, after)
    assert sum(p.numel() for p in edited.parameters()) < sum(p.numel() for p in unet.parameters())
    with pytest.raises(KeyError):
        without_block(unet, "down_blocks.0.attentions.0")
