"""`snapc evaluate`: shapes, pruned-UNet folders and ONNX artifacts scored with their own
sampler; non-shapes models and bad flags are one-line errors, checked before loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import snapc.evaluation
import snapc.models
from snapc.cli import app
from snapc.compiler import CompileOptions, compile_model
from snapc.errors import SnapcError
from snapc.evaluation import evaluate_model, load_denoiser, resolve_sampler
from snapc.pruned import PrunedRecord, save_pruned, skip_blocks
from snapc.quality import evaluate, load_feature_classifier, validation_codes
from snapc.shapes.model import load_text_encoder, load_unet
from snapc.shapes.sampler import SamplerSpec
from snapc.testing import one_error_line

REMOVED = ("mid_block.attentions.0", "up_blocks.0.resnets.1")
FIELDS = {"model", "base", "prompts", "steps", "guidance", "spacing", "guidance_embedded",
          "alpha_floor", "unet_calls_per_image", "adherence", "exact", "count", "colour",
          "shape", "size", "position", "fd", "seconds", "device"}
METRICS = ("adherence", "exact", "count", "colour", "shape", "size", "position")


def invoke(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned shapes folder (fp32) that stores a 4-step trailing sampler, and its module."""
    unet = load_unet()
    module = skip_blocks(unet, REMOVED)
    folder = tmp_path_factory.mktemp("pruned") / "shapes-test"
    folder.mkdir()
    record = PrunedRecord(name="shapes-test", base="shapes", removed=REMOVED,
                          random_weights=False,
                          sampler=SamplerSpec(steps=4, spacing="trailing").to_json())
    save_pruned(folder, module, unet.config, record, dtype=torch.float32)
    return folder, module


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """shapes compiled to ONNX at a fixed batch of 4."""
    out = tmp_path_factory.mktemp("onnx") / "shapes-onnx"
    compile_model(CompileOptions(model="shapes", target="onnx", out=out, batch=4))
    return out


def test_pruned_folder_scores_as_its_module_with_its_own_sampler(pruned):
    folder, module = pruned
    result = evaluate_model(str(folder), prompts=8)
    assert set(result) == FIELDS
    assert (result["steps"], result["spacing"], result["guidance"]) == (4, "trailing", 3.0)
    assert result["base"] == "shapes" and result["unet_calls_per_image"] == 8
    direct = evaluate(module, load_text_encoder(), load_feature_classifier(),
                      codes=validation_codes(8), steps=4, spacing="trailing")
    assert {k: result[k] for k in METRICS} == {k: direct[k] for k in METRICS}
    assert result["fd"] == pytest.approx(direct["fd"], rel=1e-6)


def test_json_fields_and_flags_override_the_stored_sampler(pruned):
    folder, _ = pruned
    result = invoke(str(folder), "--prompts", "8", "--steps", "2", "--guidance", "2",
                    "--spacing", "linspace", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == FIELDS
    assert data["model"] == str(folder) and data["base"] == "shapes"
    assert (data["prompts"], data["steps"], data["guidance"], data["spacing"]) == \
        (8, 2, 2.0, "linspace")
    assert data["unet_calls_per_image"] == 4 and not data["guidance_embedded"]
    assert data["device"] == "cpu" and data["seconds"] > 0 and data["fd"] >= 0
    assert all(0.0 <= data[k] <= 1.0 for k in METRICS)


def test_shapes_table_output():
    result = invoke("shapes", "--prompts", "4", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "adherence" in result.stdout and "UNet calls per image" in result.stdout
    assert "2 linspace DDIM steps, CFG 3" in result.stdout


def test_onnx_artifact_scores_as_the_torch_model(artifact):
    loaded = load_denoiser(str(artifact))
    assert loaded.kind == "onnx" and loaded.batch == 4 and loaded.sampler == SamplerSpec()
    # 6 prompts at batch 4: a full chunk and a padded one
    onnx = evaluate_model(loaded, prompts=6, steps=4)
    torch_ = evaluate_model("shapes", prompts=6, steps=4)
    assert onnx["device"] == "onnxruntime-cpu" and onnx["base"] == "shapes"
    assert {k: onnx[k] for k in METRICS} == {k: torch_[k] for k in METRICS}
    assert onnx["fd"] == pytest.approx(torch_["fd"], rel=1e-3)


def test_artifact_sampler_comes_from_the_manifest(artifact, tmp_path):
    copy = tmp_path / "fast"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["sampler"] = {"steps": 2, "spacing": "trailing",
                                    "guidance_embedded": True}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    spec = load_denoiser(str(copy)).sampler
    assert spec == SamplerSpec(steps=2, spacing="trailing", guidance_embedded=True)
    assert "--batch 3" in one_error_line(invoke(str(copy), "--batch", "3"))
    assert "built in" in one_error_line(invoke(str(copy), "--guidance", "5"))
    manifest["model"]["sampler"] = {"steps": 0}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "bad sampler record" in one_error_line(invoke(str(copy)))


def test_alpha_floor_flag_overrides_the_stored_floor(pruned):
    folder, _ = pruned
    plain = json.loads(invoke(str(folder), "--prompts", "4", "--steps", "2", "--json").stdout)
    result = invoke(str(folder), "--prompts", "4", "--steps", "2", "--alpha-floor", "0.5",
                    "--json")
    assert result.exit_code == 0, result.output
    floored = json.loads(result.stdout)
    assert (plain["alpha_floor"], floored["alpha_floor"]) == (0.0, 0.5)
    assert floored["fd"] != plain["fd"]  # the floor changes the first step's x0
    assert resolve_sampler(SamplerSpec(alpha_floor=0.05), alpha_floor=0.0) == SamplerSpec()


def test_guidance_flag_on_a_guidance_embedded_model():
    stored = SamplerSpec(steps=4, guidance=3.0, guidance_embedded=True)
    assert resolve_sampler(stored, guidance=3.0, steps=2) == SamplerSpec(
        steps=2, guidance=3.0, guidance_embedded=True)
    with pytest.raises(SnapcError, match="guidance 3 built in"):
        resolve_sampler(stored, guidance=5.0)


def _never_load(*args, **kwargs):
    raise AssertionError("loaded a model for a request that is an error")


@pytest.mark.parametrize("args,message", [
    (["shapes", "--prompts", "0"], "--prompts must be >= 2"),
    (["shapes", "--prompts", "1"], "--prompts must be >= 2"),
    (["shapes", "--steps", "0"], "--steps must be >= 1"),
    (["shapes", "--batch", "0"], "--batch must be >= 1"),
    (["shapes", "--spacing", "leading"], "unknown spacing 'leading'"),
    (["shapes", "--alpha-floor", "1"], "--alpha-floor must be in [0, 1)"),
    (["shapes", "--alpha-floor", "-0.1"], "--alpha-floor must be in [0, 1)"),
    (["shapes", "--eval-device", "tpu"], "unknown evaluation device 'tpu'"),
])
def test_bad_flags_are_errors_before_loading(monkeypatch, args, message):
    monkeypatch.setattr(snapc.evaluation, "load_denoiser", _never_load)
    assert message in one_error_line(invoke(*args))


@pytest.mark.parametrize("name", ["tiny", "sd15", "sd99"])
def test_non_shapes_names_are_errors_without_building(monkeypatch, name):
    monkeypatch.setattr(snapc.models, "load_model", _never_load)
    line = one_error_line(invoke(name))
    assert "shapes-family models only" in line and "pruned-UNet folder" in line
    assert f"'{name}'" in line


def test_folders_of_another_base_are_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(snapc.models, "load_model", _never_load)
    other = tmp_path / "tiny-pruned"
    other.mkdir()
    record = PrunedRecord(name="tiny-pruned", base="tiny", removed=(), random_weights=True)
    (other / "snapc_pruned.json").write_text(json.dumps(record.to_json()))
    assert "pruned 'tiny' model" in one_error_line(invoke(str(other)))
    artifact = tmp_path / "tiny-onnx"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"model": {"name": "tiny"},
                                                        "inputs": []}))
    assert "artifact of 'tiny'" in one_error_line(invoke(str(artifact)))
    (tmp_path / "plain").mkdir()
    assert "base model is unknown" in one_error_line(invoke(str(tmp_path / "plain")))
