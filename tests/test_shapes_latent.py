"""shapes-latent's recipe at tiny scale on CPU: each phase lowers its loss in a few steps
through the one training loop, writes fp16 files that load (pipeline, decoder compression),
records its checks, and the UNet phase refuses to start without the autoencoder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from snapc.decoder import load_vae
from snapc.errors import SnapcError
from snapc.shapes.data import caption
from snapc.shapes_latent.config import UNET_CONFIG, scenes
from snapc.shapes_latent.pipeline import (
    generate,
    latent_range,
    load_pipeline,
    sample_latents,
    scene_accuracy,
)
from snapc.shapes_latent.recipe import (
    PhaseOptions,
    recheck_pipeline,
    train_autoencoder,
    train_latent_unet,
)
from snapc.train.options import TrainOptions

SMALL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
             "down_block_types": ["DownEncoderBlock2D"] * 3,
             "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 32],
             "norm_num_groups": 4, "sample_size": 64}
SMALL_UNET = {**UNET_CONFIG, "block_out_channels": [16, 32, 32], "norm_num_groups": 8,
              "layers_per_block": 1, "attention_head_dim": 2}


def _options(lr: float) -> TrainOptions:
    return TrainOptions(steps=6, batch=4, lr=lr, warmup=1, ema=0.0, device="cpu",
                        checkpoint_every=100, log_every=2)


def _falls(record: dict) -> bool:
    curve = [p["loss"] for p in record["loss_curve"]]
    return curve[-1] < curve[0]


def test_scene_check_reads_true_scenes() -> None:
    codes = torch.tensor([3, 700, 9000])
    assert scene_accuracy(scenes(codes), codes) == 1.0
    assert scene_accuracy(-torch.ones(3, 3, 64, 64), codes) == 0.0


def test_phases_train_write_and_load(tmp_path: Path) -> None:
    out = tmp_path / "shapes-latent"
    phase = PhaseOptions(out=out, eval_prompts=4, eval_steps=3, scale_samples=32,
                         vae_config=SMALL_VAE, unet_config=SMALL_UNET)
    with pytest.raises(SnapcError, match="run the vae phase first"):
        train_latent_unet(phase, _options(1e-3))
    vae_record = train_autoencoder(phase, _options(3e-3))
    assert _falls(vae_record), vae_record["loss_curve"]
    assert 0.0 <= vae_record["checks"]["reconstruction_scene_accuracy"] <= 1.0
    assert vae_record["scaling_factor"] > 0
    unet_record = train_latent_unet(phase, _options(1e-3))
    assert _falls(unet_record), unet_record["loss_curve"]
    assert {"adherence", "exact"} <= set(unet_record["checks"])

    full = json.loads((out / "training.json").read_text())
    assert set(full["phases"]) == {"vae", "unet"} and full["size_mb"] < 30
    from safetensors.torch import load_file

    for weights in [out / "text_encoder.safetensors", *out.glob("*/*.safetensors")]:
        assert {v.dtype for v in load_file(str(weights)).values()} == {torch.float16}, weights
    assert "phase `unet`" in (out / "TRAINING.md").read_text()
    assert not (tmp_path / "shapes-latent.checkpoints" / "vae").exists()
    vae, unet, text = load_pipeline(out)  # the fp16 files load as fp32
    assert next(unet.parameters()).dtype == torch.float32
    assert vae.config.scaling_factor == pytest.approx(vae_record["scaling_factor"])
    latents, images = generate(vae, unet, text, [caption(5), caption(600)], steps=2)
    assert latents.shape == (2, 4, 16, 16) and images.shape == (2, 3, 64, 64)
    assert load_vae(str(out)).latent_hw == (16, 16)  # decoder compression takes the folder

    again = train_latent_unet(replace(phase, init_from=out), _options(1e-3))
    assert again["init_from"]["steps_before"] == unet_record["steps"]
    assert again["loss_curve"][0]["loss"] < unet_record["loss_curve"][0]["loss"]  # warm start
    assert "started from earlier weights (6 steps" in (out / "TRAINING.md").read_text()
    with pytest.raises(SnapcError, match="--init-from"):
        replace(phase, init_from=tmp_path).check()

    full = json.loads((out / "training.json").read_text())
    before = full["phases"]["unet"]["checks"]
    checks = recheck_pipeline(out, prompts=3, steps=2)
    rechecked = json.loads((out / "training.json").read_text())["phases"]["unet"]
    assert rechecked["checks"] == checks and checks["validation_prompts"] == 3
    assert rechecked["checks_before"] == before
    assert checks["sampler"]["x0_range"] == pytest.approx(latent_range(vae), abs=1e-3)


class _ConstantEps(torch.nn.Module):
    """A 'UNet' whose eps is a large constant: unclipped, DDIM's x0 runs far outside."""

    config = type("Config", (), {"in_channels": 4})()

    def forward(self, x, t, context, return_dict=False):
        return (torch.full_like(x, -3.0),)


def test_sampling_clips_x0_to_the_latent_range() -> None:
    noise = torch.zeros(2, 4, 16, 16)
    context = torch.zeros(2, 5, 8)
    free = sample_latents(_ConstantEps(), context, context[:1], steps=5, noise=noise)
    assert free.abs().max() > 100  # 3 / sqrt(alpha-bar at t = 999) ~ 6e4
    clipped = sample_latents(_ConstantEps(), context, context[:1], steps=5, noise=noise,
                             x0_range=2.5)
    assert clipped.abs().max() <= 2.5 + 1e-6


def test_latent_range_is_a_quantile_of_the_scaled_latents() -> None:
    from snapc.shapes_latent.config import build_vae

    torch.manual_seed(0)
    vae = build_vae(SMALL_VAE).eval()
    vae.register_to_config(scaling_factor=2.0)
    bound = latent_range(vae)
    assert bound > 0 and latent_range(vae) == bound  # computed once
    with torch.no_grad():
        z = vae.encode(scenes(torch.arange(64))).latent_dist.mean * 2.0
    assert (z.abs() <= bound).float().mean() > 0.95
