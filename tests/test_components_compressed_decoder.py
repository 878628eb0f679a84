"""A pipeline folder whose vae/ is a compressed decoder (snapc_decoder.json) compiles through
`snapc compile FOLDER --components vae_decoder`: the compiled decoder is the compressed one
(its pruned widths, its outputs), verified; a corrupt one is one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from snapc.cli import app
from snapc.decoder import load_compressed_vae, prune_decoder, save_compressed
from snapc.pipeline_models import load_vae, write_random_pipeline
from snapc.testing import one_error_line


def _compile(folder: Path, out: Path) -> object:
    return CliRunner().invoke(app, ["compile", str(folder), "--target", "onnx", "--components",
                                    "vae_decoder", "-o", str(out)])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """tiny-pipeline written as a folder, its vae/ replaced by the decoder pruned to half."""
    folder = write_random_pipeline("tiny-pipeline", tmp_path_factory.mktemp("p") / "pipe")
    pruned, record = prune_decoder(load_vae(str(folder))[0], 0.5, 0.5)
    shutil.rmtree(folder / "vae")
    (folder / "vae").mkdir()
    save_compressed(pruned, record, folder / "vae", {"base": "tiny-pipeline"})
    return folder, record


def test_compressed_vae_folder_compiles(pipeline: tuple[Path, object], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    folder, record = pipeline
    out = tmp_path / "A"
    run = _compile(folder, out)
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / "vae_decoder" / "manifest.json").read_text())
    assert manifest["verification"]["passed"], manifest["verification"]
    blocks = {b["name"]: b for b in manifest["extra"]["block_map"]["blocks"]}
    assert blocks["mid_block.resnets.0"]["out_channels"] == record.of_kind("stream")[0].width
    vae = load_compressed_vae(folder / "vae")
    spec = manifest["inputs"][0]
    z = torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out / "vae_decoder" / manifest["files"]["model"]))
    got = session.run(None, {spec["name"]: z.numpy()})[0]
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample.numpy()  # sampler latents
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_corrupt_compressed_vae_is_one_line(pipeline: tuple[Path, object],
                                            tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline[0], folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    line = one_error_line(_compile(folder, tmp_path / "B"))
    assert "compress-decoder" in line and not (tmp_path / "B").exists()
