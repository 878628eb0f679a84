"""`snapc evaluate shapes-latent`: the whole latent pipeline (text encoder, UNet, decoder) on a
tiny random-weight folder of the shapes-latent layout: a substituted decoder changes the
pictures and nothing else, the pipeline's own decoder given as --decoder changes nothing, and
bad input (weights not trained, corrupt or foreign decoder, a pixel-space model) is one error
line before any sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from snapc.cli import app
from snapc.decoder import prune_decoder, save_compressed
from snapc.evaluation_latent import (
    evaluate_latent,
    is_latent_model,
    latent_images,
    load_latent_pipeline,
)
from snapc.quality import validation_codes
from snapc.shapes.text import TextEncoder
from snapc.shapes_latent.config import UNET_CONFIG, build_vae
from snapc.testing import one_error_line

VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
       "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
       "block_out_channels": [16, 32, 32], "norm_num_groups": 4, "sample_size": 64,
       "scaling_factor": 0.7}
UNET = {**UNET_CONFIG, "block_out_channels": [16, 32, 32], "norm_num_groups": 8,
        "layers_per_block": 1, "attention_head_dim": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny shapes-latent folder (random weights) and two decoders: a compressed one of its
    autoencoder (half the channels, not distilled) and one of a 3-latent-channel autoencoder."""
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = build_vae(VAE).eval()
    pipe = root / "pipe"
    vae.save_pretrained(pipe / "vae", safe_serialization=True)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**UNET).save_pretrained(pipe / "unet", safe_serialization=True)
    save_file(TextEncoder().state_dict(), str(pipe / "text_encoder.safetensors"))
    pruned, record = prune_decoder(vae, 0.5, 0.5)
    (root / "half").mkdir()
    save_compressed(pruned, record, root / "half", {"base": str(pipe)})
    other, record = prune_decoder(build_vae({**VAE, "latent_channels": 3}).eval(), 0.5)
    (root / "other").mkdir()
    save_compressed(other, record, root / "other", {"base": "other"})
    return {"pipe": pipe, "half": root / "half", "other": root / "other"}


def _evaluate(*args: str) -> object:
    return CliRunner().invoke(app, ["evaluate", *args])


def test_decoder_substitution_changes_only_the_pictures(folders: dict[str, Path]) -> None:
    codes = validation_codes(3)
    own = load_latent_pipeline(str(folders["pipe"]))
    again = load_latent_pipeline(str(folders["pipe"]), decoder=folders["pipe"] / "vae")
    half = load_latent_pipeline(str(folders["pipe"]), decoder=folders["half"])
    z_own, img_own = latent_images(own, codes, steps=2)
    z_again, img_again = latent_images(again, codes, steps=2)
    z_half, img_half = latent_images(half, codes, steps=2)
    assert img_own.shape == (3, 3, 64, 64)
    assert torch.equal(z_own, z_half) and torch.equal(z_own, z_again)  # same noise, prompts
    assert torch.equal(img_own, img_again)
    assert (img_own - img_half).abs().max() > 1e-3  # the compressed decoder decoded these
    with torch.no_grad():
        direct = half.vae.decode(z_half / 0.7).sample.clamp(-1, 1)
    torch.testing.assert_close(img_half, direct)


def test_cli_json_names_the_decoder_and_scores(folders: dict[str, Path]) -> None:
    pipe = str(folders["pipe"])
    assert is_latent_model(pipe) and is_latent_model("shapes-latent")
    assert not is_latent_model("shapes")
    run = _evaluate(pipe, "--decoder", str(folders["half"]), "--prompts", "4", "--steps", "2",
                    "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["decoder"] == str(folders["half"]) and result["steps"] == 2
    assert result["unet_calls_per_image"] == 4 and result["prompts"] == 4
    assert 0.0 <= result["adherence"] <= 1.0 and result["fd"] >= 0.0
    full = evaluate_latent(pipe, prompts=4, steps=2)
    assert full["decoder"] == "vae/" and full["decoder_params"] > result["decoder_params"]


def test_bad_input_is_one_line(folders: dict[str, Path], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = str(folders["pipe"])
    monkeypatch.setattr("snapc.shapes_latent.config.WEIGHTS_DIR", tmp_path / "absent")
    assert "bench/train_shapes_latent.py" in one_error_line(_evaluate("shapes-latent"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folders["half"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "compress-decoder" in one_error_line(_evaluate(pipe, "--decoder", str(broken)))
    meta = json.loads((broken / "snapc_decoder.json").read_text())
    del meta["layout"]
    (broken / "snapc_decoder.json").write_text(json.dumps(meta))
    assert "corrupt decoder folder" in one_error_line(_evaluate(pipe, "--decoder", str(broken)))
    line = one_error_line(_evaluate(pipe, "--decoder", str(folders["other"])))
    assert "3-channel latents" in line
    assert "not found" in one_error_line(_evaluate(pipe, "--decoder", str(tmp_path / "no")))
    assert "drop --decoder" in one_error_line(_evaluate("shapes", "--decoder", pipe))
    assert "unknown spacing" in one_error_line(_evaluate(pipe, "--spacing", "leading"))
    assert "--alpha-floor" in one_error_line(_evaluate(pipe, "--alpha-floor", "2"))
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    (partial / "vae" / "config.json").write_text("{}")
    (partial / "training.json").write_text("{}")
    assert "unet/config.json" in one_error_line(_evaluate(str(partial)))
    assert CliRunner().invoke(app, ["models"]).exit_code == 0
