"""Robust training: steps alternate between the full UNet and random sub-networks, and the
result is a plain diffusers UNet with the original parameter names."""

from __future__ import annotations

import torch

from snapc.models import load_model
from snapc.pruned import removable_blocks
from snapc.train import RecoveryLoss, RobustTraining, TrainOptions, train
from snapc.train.data import TeacherSamples
from snapc.train.distributed import World
from snapc.train.recovery import MaybeSkip


def test_robust_training_skips_blocks_and_returns_a_plain_unet(tmp_path):
    loaded = load_model("tiny")
    original = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    sample, _, context = loaded.example_inputs
    world = World(0, 1, torch.device("cpu"))
    data = TeacherSamples(loaded.module, torch.randn(4, *context.shape[1:]), None,
                          sample_shape=tuple(sample.shape[1:]), base="tiny", batch_size=4,
                          seed=0, device=world.device, pool=4, sampling_steps=2)
    keep = ["mid_block.attentions.0"]
    method = RobustTraining(loaded.module, data, RecoveryLoss(task=0.0), keep=keep, seed=1)
    assert method.skipped_at(0) == [] and method.skipped_at(2) == []
    odd = [method.skipped_at(s) for s in (1, 3, 5, 7)]
    assert any(odd) and all(keep[0] not in s for s in odd)
    assert method.skipped_at(3) == RobustTraining(loaded.module, data, RecoveryLoss(),
                                                  keep=keep, seed=1).skipped_at(3)
    train(method, TrainOptions(steps=4, lr=1e-3, warmup=1), tmp_path, world=world)
    unet = method.trained_unet()
    assert not any(isinstance(m, MaybeSkip) for m in unet.modules())
    assert removable_blocks(unet) == removable_blocks(loaded.module)
    state = unet.state_dict()
    assert state.keys() == original.keys()
    assert any(not torch.equal(state[k], original[k]) for k in state)
    assert all(torch.equal(v, original[k]) for k, v in loaded.module.state_dict().items())
