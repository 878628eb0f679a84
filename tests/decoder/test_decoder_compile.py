"""The compressed decoder on the component path: traced by snapc.vae, exported to ONNX and
verified against PyTorch by the target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from snapc.decoder import load_compressed_vae, prune_decoder, save_compressed

TINY = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32], "norm_num_groups": 4, "sample_size": 32}


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**TINY).eval()


def test_compressed_decoder_compiles_to_onnx(vae: AutoencoderKL, tmp_path: Path) -> None:
    """The compressed folder's decoder traces with snapc.vae (the component path's tracer)
    and exports to ONNX, verified against PyTorch by the target, with the pruned widths."""
    pytest.importorskip("onnxruntime")
    from snapc.targets import get_target
    from snapc.vae import decoder_example_inputs, trace_decoder

    pruned, record = prune_decoder(vae, 0.5, 0.5)
    save_compressed(pruned, record, tmp_path / "dec", {}, None)
    loaded = load_compressed_vae(tmp_path / "dec")
    graph = trace_decoder(loaded, decoder_example_inputs(loaded, 1, 8))
    block = graph.blocks["mid_block.resnets.0"]
    assert block.out_channels == record.of_kind("stream")[0].width
    entry = get_target("onnx")
    export, _ = entry.load()
    (tmp_path / "onnx").mkdir()
    manifest = export(graph, tmp_path / "onnx", entry.make_options())
    assert manifest.verification["passed"] is True, manifest.verification
    assert manifest.verification["psnr_db"] >= manifest.verification["min_psnr_db"]
    assert (tmp_path / "onnx" / manifest.files["model"]).is_file()
