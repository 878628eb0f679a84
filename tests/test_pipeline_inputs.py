"""Input forms of issue 18: pipeline folders, original single-file checkpoints, SDXL-class UNets
with added conditioning, and the one-line errors for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from snapc import checkpoints
from snapc.cli import app
from snapc.compiler import CompileOptions, compile_model, load_graph
from snapc.errors import TraceError, WeightsError
from snapc.frontend import trace
from snapc.models import (
    MODELS,
    SD15_CONFIG,
    SD21_BASE_CONFIG,
    SDXL_CONFIG,
    TINY_CONFIG,
    TINY_XL_CONFIG,
    load_model,
)
from snapc.testing import one_error_line as _one_error_line


def snapc(*args: str) -> Result:
    """Run `snapc ARGS` in this process (typer's CliRunner) and return the result."""
    return CliRunner().invoke(app, list(args))


def compile_verified(model: str, out: Path, target: str = "onnx", **options: object) -> dict:
    """Compile MODEL in this process and return its manifest, asserting it verified."""
    compile_model(CompileOptions(model=model, target=target, out=out, **options))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"], manifest["verification"]
    return manifest


def random_unet(config: dict, seed: int = 7) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Return a diffusers UNet state dict in the original SD layout (``model.diffusion_model.*``):
    the inverse of diffusers' ``convert_ldm_unet_checkpoint``, built from its mapping (the flat
    layers, the label_emb of "text_time", the ResNet renames and the block numbering)."""
    flat = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        flat |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    per_block = config["layers_per_block"]
    stages = len(config["block_out_channels"])
    prefixes: list[tuple[str, str, bool]] = []  # (diffusers, ldm, is a ResNet)
    for i in range(stages):
        for j in range(per_block):
            ldm = f"input_blocks.{(per_block + 1) * i + j + 1}"
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"{ldm}.0.", True),
                         (f"down_blocks.{i}.attentions.{j}.", f"{ldm}.1.", False)]
        for j in range(per_block + 1):
            ldm = f"output_blocks.{(per_block + 1) * i + j}"
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"{ldm}.0.", True),
                         (f"up_blocks.{i}.attentions.{j}.", f"{ldm}.1.", False)]
        if i < stages - 1:
            up = (per_block + 1) * i + per_block
            slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            prefixes += [(f"down_blocks.{i}.downsamplers.0.conv.",
                          f"input_blocks.{(per_block + 1) * (i + 1)}.0.op.", False),
                         (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{up}.{slot}.conv.",
                          False)]
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", True),
                 ("mid_block.attentions.0.", "middle_block.1.", False),
                 ("mid_block.resnets.1.", "middle_block.2.", True)]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in flat:
            out[checkpoints.LDM_UNET_PREFIX + flat[key]] = value
            continue
        hf, ldm, is_resnet = next(p for p in prefixes if key.startswith(p[0]))
        rest = key[len(hf):]
        if is_resnet:
            head, _, tail = rest.partition(".")
            rest = f"{resnet[head]}.{tail}"
        out[checkpoints.LDM_UNET_PREFIX + ldm + rest] = value
    return out


def write_pipeline(folder: Path, unet: UNet2DConditionModel, **save: object) -> Path:
    """Write a diffusers pipeline folder as save_pretrained lays it out: model_index.json,
    unet/ and scheduler/ (no text encoder or VAE: the UNet is what this step loads)."""
    unet.save_pretrained(folder / "unet", **save)
    DDIMScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": [None, None],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None]}))
    return folder


def assert_same_weights(module: nn.Module, reference: nn.Module) -> None:
    want = reference.state_dict()
    got = module.state_dict()
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)


# --- pipeline folders -------------------------------------------------------------------------

def test_pipeline_folder_compiles_and_verifies(tmp_path):
    unet = random_unet(TINY_CONFIG)
    pipe = write_pipeline(tmp_path / "my-pipeline", unet)
    assert_same_weights(load_model(str(pipe)).module, unet)
    manifest = compile_verified(str(pipe), tmp_path / "out")
    assert manifest["model"]["name"] == "my-pipeline" and not manifest["model"]["random_weights"]
    assert manifest["model"]["weights_path"].endswith("unet/diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("save", [{"max_shard_size": "200KB"}, {"variant": "fp16"}],
                         ids=["sharded", "variant"])
def test_pipeline_folder_sharded_or_variant_weights(tmp_path, save):
    unet = random_unet(TINY_CONFIG)
    pipe = write_pipeline(tmp_path / "pipe", unet, **save)
    assert_same_weights(load_model(str(pipe)).module, unet)


def test_pipeline_folder_without_unet_is_one_line_error(tmp_path):
    pipe = write_pipeline(tmp_path / "pipe", random_unet(TINY_CONFIG))
    for path in (pipe / "unet").iterdir():
        path.unlink()
    (pipe / "unet").rmdir()
    line = one_error_line_stderr(snapc("compile", str(pipe), "--target", "onnx", "-o",
                                       str(tmp_path / "x")))
    assert "has no unet/" in line and "save_pretrained" in line and "scheduler" in line
    assert not (tmp_path / "x").exists()


def test_pipeline_folder_without_unet_weights_is_one_line_error(tmp_path):
    pipe = write_pipeline(tmp_path / "pipe", random_unet(TINY_CONFIG))
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"unet has no diffusion_pytorch_model.*save the "
                                           "whole pipeline"):
        load_model(str(pipe))
    line = one_error_line_stderr(snapc("inspect", str(pipe)))
    assert "no diffusion_pytorch_model.safetensors" in line


# --- single-file checkpoints ------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_XL_CONFIG, SD15_CONFIG, SD21_BASE_CONFIG,
                                    SDXL_CONFIG], ids=["tiny", "tiny-xl", "sd15", "sd21-base",
                                                       "sdxl"])
def test_original_layout_converts_back_with_diffusers(config):
    with torch.device("meta"):
        state = UNet2DConditionModel(**config).state_dict()
    converted = checkpoints.convert_ldm_unet(to_ldm(state, config), config, Path("x"))
    assert converted.keys() == state.keys()
    assert all(converted[k].shape == state[k].shape for k in state)


@pytest.mark.parametrize("name,config", [("sd15", SD15_CONFIG), ("sd21-base", SD21_BASE_CONFIG),
                                         ("sdxl", SDXL_CONFIG)])
def test_architecture_is_read_from_the_keys(name, config):
    with torch.device("meta"):
        state = to_ldm(UNet2DConditionModel(**config).state_dict(), config)
    assert checkpoints.detect_arch(state, Path("x")) == name


@pytest.mark.parametrize("arch,config", [("tiny", TINY_CONFIG), ("tiny-xl", TINY_XL_CONFIG)])
def test_single_file_checkpoint_loads_and_equals_the_original(tmp_path, arch, config):
    unet = random_unet(config)
    full = to_ldm({k: v.contiguous() for k, v in unet.state_dict().items()}, config)
    # an original checkpoint also holds the VAE and the text encoder: never read
    full |= {"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}
    path = tmp_path / "model.safetensors"
    save_file(full, str(path))
    loaded = load_model(str(path), arch=arch)
    assert_same_weights(loaded.module, unet)
    assert loaded.info.name == f"{arch}:model.safetensors" and not loaded.info.random_weights
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(*loaded.example_inputs[:3], **_added(loaded))[0],
                                   unet(*loaded.example_inputs[:3], **_added(loaded))[0])


def _added(loaded) -> dict:
    inputs = loaded.example_inputs
    if len(inputs) == 3:
        return {}
    return {"added_cond_kwargs": {"text_embeds": inputs[3], "time_ids": inputs[4]}}


def test_single_file_checkpoint_compiles_and_verifies(tmp_path):
    unet = random_unet(TINY_CONFIG)
    path = tmp_path / "v1-tiny.safetensors"
    save_file(to_ldm({k: v.contiguous() for k, v in unet.state_dict().items()}, TINY_CONFIG),
              str(path))
    manifest = compile_verified(str(path), tmp_path / "out", arch="tiny")
    assert manifest["model"]["name"] == "tiny:v1-tiny.safetensors"
    # the architecture is not one snapc can read off the keys: a one-line error naming --arch
    line = one_error_line_stderr(snapc("compile", str(path), "--target", "onnx", "-o",
                                       str(tmp_path / "x")))
    assert "layout snapc does not know" in line and "32-wide text" in line and "--arch" in line
    assert not (tmp_path / "x").exists()


def test_single_file_with_the_wrong_arch_is_one_line_error(tmp_path):
    unet = random_unet(TINY_CONFIG)
    path = tmp_path / "v1-tiny.safetensors"
    save_file(to_ldm({k: v.contiguous() for k, v in unet.state_dict().items()}, TINY_CONFIG),
              str(path))
    with pytest.raises(WeightsError, match=r"missing key 'model\.diffusion_model\.label_emb"):
        load_model(str(path), arch="tiny-xl")
    stray = {**to_ldm(unet.state_dict(), TINY_CONFIG),
             "model.diffusion_model.extra.weight": torch.zeros(1)}
    save_file({k: v.contiguous() for k, v in stray.items()}, str(path))
    with pytest.raises(WeightsError, match=r"1 UNet tensor\(s\).*'model\.diffusion_model\.extra"):
        load_model(str(path), arch="tiny")


# --- SDXL-class UNets ---------------------------------------------------------------------------

def test_sdxl_layout_folder_compiles_to_onnx_and_coreml(tmp_path):
    pytest.importorskip("coremltools")
    folder = tmp_path / "xl-unet"
    random_unet(TINY_XL_CONFIG).save_pretrained(folder)
    # Core ML as traced: the Neural Engine attention layout verifies too (below, slow: 80 s)
    for target, options in (("onnx", {}), ("coreml", {"attention": "original"})):
        manifest = compile_verified(str(folder), tmp_path / target, target, latent=8,
                                    target_options=options)
        assert [i["name"] for i in manifest["inputs"]] == [
            "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        assert [i["shape"] for i in manifest["inputs"][3:]] == [[1, 32], [1, 6]]


@pytest.mark.slow
def test_sdxl_layout_coreml_with_the_neural_engine_attention_layout(tmp_path):
    pytest.importorskip("coremltools")
    manifest = compile_verified("tiny-xl", tmp_path / "ane", "coreml", latent=8)
    assert manifest["target_options"]["attention"] == "ane"


@pytest.fixture(scope="module")
def tiny_xl_graph():
    """Return the traced `tiny-xl` UNet at 8x8 latents (random weights, seed 0)."""
    return load_graph("tiny-xl", latent=8)


def test_sdxl_layout_trace_and_block_map(tiny_xl_graph):
    graph = tiny_xl_graph
    assert graph.input_names[3:] == ("text_embeds", "time_ids")
    assert [tuple(t.shape) for t in graph.example_inputs[3:]] == [(1, 32), (1, 6)]
    assert graph.blocks.counts() == {"resnet": 12, "transformer": 6}
    assert all(b.removable for b in graph.blocks)
    assert "add_embedding" in graph.blocks.uncovered


def test_sdxl_layout_through_removal_search_quantization(tiny_xl_graph):
    from snapc.passes import Quantize, RemoveBlocks, SearchBlocks
    from snapc.pipeline import PassContext, Pipeline

    result = Pipeline([RemoveBlocks(["mid_block.attentions.0"]),
                       SearchBlocks(device="iphone14pro-ane", budget=0.85, calibration=2),
                       Quantize("w8a8", calibration=2)]).run(
        tiny_xl_graph, PassContext(check=True, verify=True))
    assert [r.name for r in result.records] == ["remove_blocks", "search_blocks", "quantize"]
    assert len(result.graph.removed) >= 2 and len(result.graph.quant) > 50


def test_sdxl_layout_through_fusion(tiny_xl_graph):
    from snapc.passes import fusion_passes
    from snapc.pipeline import PassContext, Pipeline

    result = Pipeline(fusion_passes("all")).run(tiny_xl_graph, PassContext(check=True,
                                                                           verify=True))
    changed = {r.name for r in result.records if r.changes}
    assert {"fold_attention_heads", "fuse_group_norm_silu", "fuse_geglu"} <= changed
    assert result.records[-1].numerics.psnr_db > 60


def test_inspect_sdxl_json():
    result = snapc("inspect", "sdxl", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    totals = report["totals"]
    assert totals["params"] == 2_567_463_684
    assert totals["resnet_blocks"] == 17 and totals["transformer_blocks"] == 11
    assert report["inputs"]["text_embeds"] == [1, 1280] and report["inputs"]["time_ids"] == [1, 6]
    assert report["inputs"]["encoder_hidden_states"] == [1, 77, 2048]
    assert "sdxl" in MODELS and MODELS["sdxl"].config is SDXL_CONFIG


# --- configurations snapc cannot trace ----------------------------------------------------------

class _Branchy(nn.Module):
    """Takes a data-dependent branch, which torch.export cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gate = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


def test_untraceable_module_names_its_block_type():
    with pytest.raises(TraceError, match=r"cannot trace _Net: _Branchy at gate failed"):
        trace(_Net(), (torch.randn(1, 4, 4, 4),))


def test_untraceable_config_is_one_line_error(tmp_path):
    config = {**TINY_CONFIG, "class_embed_type": "timestep"}  # needs class labels
    folder = tmp_path / "class-unet"
    random_unet(config).save_pretrained(folder)
    line = one_error_line_stderr(snapc("compile", str(folder), "--target", "onnx", "-o",
                                       str(tmp_path / "x")))
    assert "cannot trace UNet2DConditionModel" in line and "class_labels" in line
    assert not (tmp_path / "x").exists()


def one_error_line_stderr(result) -> str:
    """Return the single `error:` line of a failed run (its stderr; exit 2, no traceback)."""
    assert "Traceback" not in result.output, result.output
    return _one_error_line(result, "stderr")
