"""`snapc compile --components`: each component compiled and verified in its sub-folder, a
top-level manifest listing them with the sampler and tokenizer; bad requests are one-line
errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from snapc.cli import app
from snapc.components import COMPONENTS_FORMAT, parse_components
from snapc.errors import SnapcError
from snapc.pruned import PrunedRecord, save_pruned, skip_blocks
from snapc.shapes.model import load_text_encoder, load_unet
from snapc.shapes.sampler import SamplerSpec
from snapc.shapes.text import MAX_TOKENS, tokenize
from snapc.testing import one_error_line


def compile_cli(*args: str):
    return CliRunner().invoke(app, ["compile", *args])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("components") / "A"
    result = compile_cli("shapes", "--target", "onnx", "--components", "unet,text_encoder",
                         "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_parse_components_orders_and_rejects():
    assert parse_components("text_encoder,unet") == ("unet", "text_encoder")
    assert parse_components(" unet ") == ("unet",)
    for bad, word in (("unet,vae", "unknown component 'vae'"), ("unet,unet", "twice"),
                      ("", "empty")):
        with pytest.raises(SnapcError, match=word):
            parse_components(bad)


def test_manifest_lists_verified_components(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format"] == COMPONENTS_FORMAT and manifest["target"] == "onnx"
    assert [c["name"] for c in manifest["components"]] == ["unet", "text_encoder"]
    unet, text = manifest["components"]
    for entry in (unet, text):
        sub = json.loads((artifact / entry["manifest"]).read_text())
        assert sub["verification"]["passed"] and entry["verification"]["passed"]
        assert (artifact / entry["files"]["model"]).is_file()
        assert entry["inputs"] == sub["inputs"]
    assert unet["batch"] == 2 and manifest["unet_cfg_batched"]  # CFG halves in one call
    assert text["inputs"] == [{"name": "input_ids", "shape": [1, MAX_TOKENS], "dtype": "int64"}]
    assert text["outputs"][0]["shape"] == [1, MAX_TOKENS, 128]
    assert manifest["sampler"] == SamplerSpec().to_json()
    assert manifest["generate"]["tokenizer"]["max_tokens"] == MAX_TOKENS
    assert manifest["generate"]["unconditional_prompt"] == ""
    assert not list(artifact.parent.glob(".*partial*"))


def test_text_encoder_artifact_matches_torch(artifact):
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "text_encoder" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for text in ("", "a large green cross at the bottom left"):
        tokens = tokenize([text])
        got = session.run(None, {"input_ids": tokens.numpy()})[0]
        want = load_text_encoder()(tokens).detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_pruned_folder_sampler_reaches_the_manifest(tmp_path):
    unet = load_unet()
    folder = tmp_path / "shapes-fast"
    folder.mkdir()
    sampler = SamplerSpec(steps=4, spacing="trailing", guidance_embedded=True)
    save_pruned(folder, skip_blocks(unet, ["mid_block.attentions.0"]), unet.config,
                PrunedRecord(name="shapes-fast", base="shapes",
                             removed=("mid_block.attentions.0",), random_weights=False,
                             sampler=sampler.to_json()), dtype=torch.float32)
    out = tmp_path / "A"
    result = compile_cli(str(folder), "--target", "onnx", "--components", "text_encoder",
                         "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == sampler.to_json()
    assert manifest["unet_cfg_batched"] is False  # guidance built in: one call per step
    assert manifest["model"]["base"] == "shapes"
    assert [c["name"] for c in manifest["components"]] == ["text_encoder"]


@pytest.mark.parametrize(("model", "components", "expected"), [
    ("tiny", "unet,text_encoder", "has no text encoder"),
    ("shapes", "unet,vae", "unknown component 'vae'"),
])
def test_bad_requests_are_one_line_and_write_nothing(tmp_path, model, components, expected):
    out = tmp_path / "A"
    result = compile_cli(model, "--target", "onnx", "--components", components, "-o", str(out))
    assert expected in one_error_line(result)
    assert not out.exists() and not list(tmp_path.iterdir())
