"""A pipeline's text encoder and VAE decoder on the other targets: Core ML (converted and
verified by the MIL interpreter), TVM x86 (built, verified, and run again through
snapc.runtime.TvmFunction, the runtime of `snapc generate` for x86 artifacts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snapc.compiler import CompileOptions
from snapc.components import compile_components
from snapc.pipeline_models import load_text_encoder, load_vae
from snapc.runtime import TvmFunction

COMPONENTS = ["text_encoder", "vae_decoder"]


def _compiled(tmp_path, target: str) -> dict:
    out = tmp_path / target
    compile_components(CompileOptions(model="tiny-pipeline", target=target, out=out),
                       COMPONENTS)
    return json.loads((out / "manifest.json").read_text())


def test_coreml_components_verify(tmp_path):
    manifest = _compiled(tmp_path, "coreml")
    assert [c["name"] for c in manifest["components"]] == COMPONENTS
    for entry in manifest["components"]:
        sub = json.loads((tmp_path / "coreml" / entry["manifest"]).read_text())
        assert sub["verification"]["passed"] and sub["verification"]["psnr_db"] >= 35
        assert sub["verification"]["runtime"].startswith("numpy MIL interpreter")
    decoder = json.loads((tmp_path / "coreml" / "vae_decoder" / "manifest.json").read_text())
    assert decoder["target_options"]["frontend"] == "trace"  # the default, as the text encoder
    assert decoder["extra"]["block_map"]["counts"] == {"resnet": 6, "transformer": 1}


def test_tvm_x86_components_run_through_the_vm(tmp_path):
    pytest.importorskip("tvm")
    manifest = _compiled(tmp_path, "x86")
    folder = tmp_path / "x86"
    runs = {}
    for entry in manifest["components"]:
        sub = json.loads((folder / entry["manifest"]).read_text())
        assert sub["verification"]["passed"]
        tvm = sub["extra"]["tvm"]
        runs[entry["name"]] = TvmFunction(folder / entry["files"]["library"],
                                          folder / entry["files"]["params"],
                                          tvm["param_order"], entry["batch"], tvm["entry"])
    text = load_text_encoder("tiny-pipeline")
    tokens = torch.randint(0, 1000, (3, 16))  # 3 rows through a batch-1 build: chunked
    np.testing.assert_allclose(runs["text_encoder"](tokens), text.module(tokens)[0].detach(),
                               atol=1e-4)
    vae = load_vae("tiny-pipeline")[0]
    latents = torch.randn(2, 4, 16, 16)
    want = vae.decode(latents / vae.config.scaling_factor).sample.detach()
    np.testing.assert_allclose(runs["vae_decoder"](latents), want, atol=1e-4)
