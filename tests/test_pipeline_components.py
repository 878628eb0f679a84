"""Whole SD-1.5-layout pipelines through `snapc compile --components unet,text_encoder,
vae_decoder` and `snapc generate`: each component verified, the pictures equal diffusers' own
StableDiffusionPipeline on the same weights; pipeline folders; bad input as one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from snapc.cli import app
from snapc.compiler import CompileOptions
from snapc.components import SD_SCHEDULE, compile_components
from snapc.generate import generate, load_artifact
from snapc.models import load_model
from snapc.pipeline_models import load_text_encoder, load_vae, write_random_pipeline
from snapc.testing import one_error_line

PROMPTS = ("a photo of a red cat", "a horse on the beach at sunset")
FAST = {"simplify": False}  # onnxsim is not what these tests check


def snapc(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "A"
    compile_components(CompileOptions(model="tiny-pipeline", target="onnx", out=out,
                                      target_options=FAST),
                       ["unet", "text_encoder", "vae_decoder"])
    return out


def test_manifest_lists_three_verified_components(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [c["name"] for c in manifest["components"]] == ["unet", "text_encoder", "vae_decoder"]
    unet, text, decoder = manifest["components"]
    for entry in manifest["components"]:
        sub = json.loads((artifact / entry["manifest"]).read_text())
        assert sub["verification"]["passed"] and entry["verification"]["psnr_db"] > 60
        assert (artifact / entry["files"]["model"]).is_file()
    assert unet["inputs"][2]["shape"] == [2, 16, 32]  # CFG batch x CLIP length x width
    assert text["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}]
    assert text["outputs"][0]["shape"] == [1, 16, 32]
    assert decoder["inputs"][0]["shape"] == [1, 4, 16, 16]
    assert decoder["outputs"][0]["shape"] == [1, 3, 32, 32]
    setup = manifest["generate"]
    assert setup["tokenizer"] == {"kind": "clip", "folder": "tokenizer", "max_tokens": 16}
    assert setup["latent"] == {"channels": 4, "size": 16} and setup["image"]["size"] == 32
    assert setup["scheduler"]["beta_schedule"] == "scaled_linear"
    assert (artifact / "tokenizer" / "tokenizer.json").is_file()
    block_map = json.loads((artifact / decoder["manifest"]).read_text())["extra"]["block_map"]
    assert block_map["counts"] == {"resnet": 6, "transformer": 1}
    assert block_map["blocks"][1]["name"] == "mid_block.attentions.0"


def test_pictures_equal_diffusers_pipeline(artifact):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    images, records = generate(load_artifact(artifact), list(PROMPTS), steps=3, seed=2)
    assert images.shape == (2, 3, 32, 32) and [r["prompt"] for r in records] == list(PROMPTS)
    text = load_text_encoder("tiny-pipeline")
    pipe = StableDiffusionPipeline(
        vae=load_vae("tiny-pipeline")[0], text_encoder=text.module, tokenizer=text.tokenizer,
        unet=load_model("tiny-pipeline").module, safety_checker=None, feature_extractor=None,
        scheduler=DDIMScheduler(**SD_SCHEDULE, timestep_spacing="linspace"),
        requires_safety_checker=False)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    for i, prompt in enumerate(PROMPTS):
        want = pipe(prompt, num_inference_steps=3, guidance_scale=3.0, latents=noise[i:i + 1],
                    output_type="pt").images  # in [0, 1]
        np.testing.assert_allclose((images[i:i + 1] + 1) / 2, want, atol=2e-4)


def test_generate_cli_writes_pictures(artifact, tmp_path):
    out = tmp_path / "imgs"
    result = snapc("generate", str(artifact), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                   "--steps", "2", "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["runtime"] == "onnxruntime-cpu" and data["prompts"] == 2
    assert "matches" not in data["images"][0]  # only shapes pictures are decoded
    for record in data["images"]:
        assert Image.open(out / record["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] >= 2 * 128


def test_pipeline_folder_compiles_every_component(tmp_path):
    folder = write_random_pipeline("tiny-pipeline", tmp_path / "my-pipe", seed=5)
    out = tmp_path / "A"
    result = snapc("compile", str(folder), "--target", "onnx", "--components",
                   "text_encoder,vae_decoder", "--fusions", "all", "--quantize", "w8",
                   "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["model"]["random_weights"]
    decoder = json.loads((out / "vae_decoder" / "manifest.json").read_text())
    names = [p["name"] for p in decoder["passes"]]
    assert "quantize" in names and any(n.startswith("fuse_") for n in names)
    assert decoder["quantization"]["counts"]["w8"] > 0 and decoder["verification"]["passed"]
    assert not decoder["model"]["random_weights"]
    assert (out / "tokenizer").is_dir()
    text = json.loads((out / "text_encoder" / "manifest.json").read_text())
    assert text["quantization"]["counts"]["w8"] > 0 and text["verification"]["passed"]


@pytest.mark.parametrize(("remove", "components", "expected"), [
    ("vae", "unet,vae_decoder", "has no vae/"),
    ("tokenizer", "text_encoder", "has no tokenizer/"),
    ("text_encoder", "unet,text_encoder", "has no text_encoder/"),
])
def test_pipeline_folder_missing_a_component_is_one_line(tmp_path, remove, components,
                                                         expected):
    folder = write_random_pipeline("tiny-pipeline", tmp_path / "pipe")
    shutil.rmtree(folder / remove)
    out = tmp_path / "A"
    line = one_error_line(snapc("compile", str(folder), "--target", "onnx", "--components",
                                components, "-o", str(out)), stream="output")
    assert expected in line and "drop" in line and "save_pretrained" in line
    assert not out.exists() and not list(tmp_path.glob(".A*"))


@pytest.mark.parametrize(("model", "components", "expected"), [
    ("shapes", "unet,vae_decoder", "pixel space and has no VAE"),
    ("tiny", "unet,vae_decoder", "has no vae decoder"),
])
def test_models_without_a_vae_are_one_line(tmp_path, model, components, expected):
    out = tmp_path / "A"
    line = one_error_line(snapc("compile", model, "--target", "onnx", "--components",
                                components, "-o", str(out)))
    assert expected in line
    assert not out.exists()


def test_prompt_longer_than_the_tokenizer_is_one_line(artifact, tmp_path):
    out = tmp_path / "imgs"
    line = one_error_line(snapc("generate", str(artifact), "--prompt", PROMPTS[0], "--prompt",
                                " ".join(["cat"] * 15), "-o", str(out)))
    assert "prompt 2 takes 17 tokens; the text encoder takes at most 16" in line
    assert not out.exists()


def _copy_without(artifact, tmp_path, component: str):
    copy = tmp_path / "B"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"] = [c for c in manifest["components"] if c["name"] != component]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(("component", "expected"), [
    ("text_encoder", "has no text_encoder component"),
    ("vae_decoder", "has no vae_decoder component to turn them into a picture"),
])
def test_artifact_without_a_component_is_one_line(artifact, tmp_path, component, expected):
    copy = _copy_without(artifact, tmp_path, component)
    out = tmp_path / "imgs"
    line = one_error_line(snapc("generate", str(copy), "--prompt", PROMPTS[0], "-o", str(out)))
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize(("target", "expected"), [
    ("coreml", "generate needs macOS"),
    ("arm-cpu", "does not run on this CPU"),
])
def test_artifacts_of_other_devices_are_one_line(artifact, tmp_path, target, expected):
    copy = tmp_path / "B"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "target": target}))
    out = tmp_path / "imgs"
    line = one_error_line(snapc("generate", str(copy), "--prompt", PROMPTS[0], "-o", str(out)))
    assert expected in line
    assert not out.exists()
