"""Decoder distillation resumes exactly: a run stopped after 3 steps and resumed to 6 ends
with the weights of an uninterrupted 6-step run (batches are drawn by step)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from snapc.decoder import DecoderDistillation, DecoderLoss, prune_decoder
from snapc.decoder.latents import RandomLatents
from snapc.train import TrainOptions, train
from snapc.train.distributed import World

TINY = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 16], "norm_num_groups": 4, "sample_size": 16}
CPU = World(0, 1, torch.device("cpu"))


def _method(vae: AutoencoderKL) -> DecoderDistillation:
    pruned, record = prune_decoder(vae, 0.5, 0.5)
    source = RandomLatents((4, 8, 8), 1.0, seed=0, device=torch.device("cpu"))
    return DecoderDistillation(vae, pruned, record.to_json(), source, 2, DecoderLoss(),
                               record.stage_channels())


def _options(steps: int) -> TrainOptions:
    return TrainOptions(steps=steps, batch=2, lr=1e-3, warmup=1, device="cpu",
                        checkpoint_every=3, log_every=1)


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    whole = train(_method(vae), _options(6), tmp_path / "a", world=CPU)
    train(_method(vae), _options(3), tmp_path / "b", world=CPU)
    resumed = train(_method(vae), _options(6), tmp_path / "b", world=CPU, resume=True)
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]
