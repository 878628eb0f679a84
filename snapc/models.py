"""Named UNet architectures and weight loading: what `snapc compile MODEL` accepts.

MODEL is a registered name (``sd15``, ``sd21-base``, ``sdxl``, ``tiny``, ``shapes``, ...), a
diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``,
sharded or a variant such as ``.fp16``), a diffusers pipeline folder (``model_index.json`` with
``unet/``), an original Stable Diffusion single-file checkpoint (SD 1.x / 2.x / SDXL, its
architecture read from its keys; snapc.checkpoints), or a weights file with diffusers names
together with ``arch=`` a registered name. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from snapc.errors import SnapcError, UnknownNameError, WeightsError
from snapc.families import is_latent_family, is_shapes_family, is_trained_family
from snapc.graph import ModelInfo
from snapc.model_io import LoadedModel, file_sha256, load_state_strict, read_state_dict

__all__ = [
    "ModelSpec",
    "LoadedModel",
    "MODELS",
    "load_model",
    "unet_example_inputs",
    "SD15_CONFIG",
    "SD21_BASE_CONFIG",
    "SDXL_CONFIG",
    "TINY_CONFIG",
    "TINY_XL_CONFIG",
    "read_state_dict",
    "load_state_strict",
    "is_shapes_family",
    "is_latent_family",
    "is_trained_family",
    "file_sha256",
]

# Exact public config of runwayml/stable-diffusion-v1-5 unet/config.json (diffusers format).
SD15_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# Exact public config of stabilityai/stable-diffusion-2-1-base unet/config.json: linear
# projections, per-stage heads ("attention_head_dim" is the head count in diffusers' naming),
# OpenCLIP-H text states of width 1024.
SD21_BASE_CONFIG: dict = {
    **SD15_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": False,
}

# Exact public config of stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: three
# stages (the first without attention), 1 / 2 / 10 transformer layers per block, 2048-wide text
# states (CLIP-L + OpenCLIP-bigG) and the added conditioning "text_time" (pooled text embeds
# 1280 + six size/crop ids x 256 = 2816). 2,567,463,684 params.
SDXL_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# A small SD-shaped UNet for tests: two stages, layers_per_block 2, a cross-attention mid block.
TINY_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# A small SDXL-shaped UNet for tests: attention-free first stage, 1 and 2 transformer layers
# per block, linear projections, per-stage heads and the "text_time" added conditioning
# (text_embeds 32 + 6 time ids x 8 = 80).
TINY_XL_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 48,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 8,
}

CONTEXT_LEN = {"sd15": 77, "sd21-base": 77, "sdxl": 77, "tiny": 16, "tiny-xl": 16,
               "sd15-pipeline": 77, "tiny-pipeline": 16}
# SDXL's added conditioning: original size, crop top-left and target size, in pixels.
TIME_IDS = 6


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name: how to build it and whether its weights are random."""

    name: str
    description: str
    build: Callable[[int, int | None, torch.device, int], LoadedModel]
    config: dict | None = None  # the diffusers UNet config of a random-weight architecture


def unet_example_inputs(
    config: dict, batch: int, latent: int | None, context_len: int,
    device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Return seeded (sample, timestep, encoder_hidden_states) for a diffusers UNet config,
    and (text_embeds, time_ids) after them for SDXL's added conditioning (``addition_embed_type``
    "text_time"): pooled text embeds and the six size / crop ids of a ``latent`` x 8 image."""
    size = latent or int(config.get("sample_size") or 64)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.get("in_channels", 4), size, size, generator=gen)
    timestep = torch.full((batch,), 500.0)
    dim = config["cross_attention_dim"]
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    context = torch.randn(batch, context_len, dim, generator=gen)
    inputs: tuple[torch.Tensor, ...] = (sample, timestep, context)
    if config.get("addition_embed_type") == "text_time":
        width = int(config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(
            config["addition_time_embed_dim"])
        if width < 1:
            raise SnapcError(
                f"UNet config: projection_class_embeddings_input_dim "
                f"{config['projection_class_embeddings_input_dim']} leaves no room for text_embeds "
                f"next to {TIME_IDS} time ids x addition_time_embed_dim "
                f"{config['addition_time_embed_dim']}; fix the config")
        pixels = float(size * 8)
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels]).repeat(batch, 1)
        inputs += (torch.randn(batch, width, generator=gen), time_ids)
    return tuple(t.to(device) for t in inputs)


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


BuildFn = Callable[[int, int | None, torch.device, int], LoadedModel]


def _random_unet(name: str, config: dict) -> BuildFn:
    def build(batch: int, latent: int | None, device: torch.device, seed: int) -> LoadedModel:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        with torch.device(device):
            module = UNet2DConditionModel(**config)
        inputs = unet_example_inputs(config, batch, latent, CONTEXT_LEN[name], device, seed)
        info = ModelInfo(name=name, random_weights=True, config=dict(config),
                         weights_sha256=f"random-seed{seed}-config{_config_hash(config)}")
        return LoadedModel(module.eval(), inputs, info)

    return build


def _shapes(batch: int, latent: int | None, device: torch.device, seed: int) -> LoadedModel:
    from snapc.shapes import model as shapes_model

    module = shapes_model.load_unet()
    inputs = shapes_model.example_inputs(batch)
    if latent is not None and latent != inputs[0].shape[-1]:
        raise WeightsError(f"model 'shapes' is trained at 32x32; drop --latent {latent}")
    weights = shapes_model.weights_path()
    info = ModelInfo(name="shapes", random_weights=False, config=dict(module.config),
                     weights_path=str(weights), weights_sha256=file_sha256(weights))
    return LoadedModel(module.to(device), tuple(t.to(device) for t in inputs), info)


def _shapes_latent(batch: int, latent: int | None, device: torch.device, seed: int
                   ) -> LoadedModel:
    from snapc.shapes_latent.family import load_unet_model

    return load_unet_model(batch, latent, device, seed)


WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"


def _shipped_pruned(name: str) -> BuildFn:
    """Return the builder of a pruned-UNet folder shipped under snapc/weights/NAME."""
    def build(batch: int, latent: int | None, device: torch.device, seed: int) -> LoadedModel:
        folder = WEIGHTS_ROOT / name
        if not folder.is_dir():
            raise WeightsError(f"shipped weights of {name!r} missing: {folder}; reinstall snapc")
        loaded = _load_pruned(folder, batch, latent, seed)
        return LoadedModel(loaded.module.to(device), tuple(t.to(device)
                                                            for t in loaded.example_inputs),
                           loaded.info, removed=loaded.removed)

    return build


MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "Stable Diffusion v1.5 UNet, 859.5 M params (random weights)",
                      _random_unet("sd15", SD15_CONFIG), SD15_CONFIG),
    "sd21-base": ModelSpec("sd21-base", "Stable Diffusion 2.1-base UNet (random weights)",
                           _random_unet("sd21-base", SD21_BASE_CONFIG), SD21_BASE_CONFIG),
    "sdxl": ModelSpec("sdxl", "Stable Diffusion XL base UNet, 2,567.5 M params, added "
                      "text_embeds / time_ids conditioning (random weights)",
                      _random_unet("sdxl", SDXL_CONFIG), SDXL_CONFIG),
    "tiny": ModelSpec("tiny", "small SD-shaped UNet for tests (random weights)",
                      _random_unet("tiny", TINY_CONFIG), TINY_CONFIG),
    "tiny-xl": ModelSpec("tiny-xl", "small SDXL-shaped UNet with added conditioning for tests "
                         "(random weights)", _random_unet("tiny-xl", TINY_XL_CONFIG),
                         TINY_XL_CONFIG),
    # Whole pipelines (UNet + CLIP text encoder + VAE, snapc.pipeline_models): the UNet here,
    # every component with --components.
    "sd15-pipeline": ModelSpec("sd15-pipeline", "Stable Diffusion v1.5 pipeline layout: sd15 "
                               "UNet, CLIP ViT-L/14 text encoder, AutoencoderKL, offline "
                               "tokenizer (random weights)", _random_unet("sd15-pipeline",
                                                                          SD15_CONFIG)),
    "tiny-pipeline": ModelSpec("tiny-pipeline", "small SD-1.5-layout pipeline for tests: tiny "
                               "UNet, CLIP text encoder, VAE (random weights)",
                               _random_unet("tiny-pipeline", TINY_CONFIG)),
    "shapes": ModelSpec("shapes", "trained 32x32 text-to-image reference model (shipped)",
                        _shapes),
    "shapes-small": ModelSpec(
        "shapes-small", "shapes pruned to half its iPhone latency and recovered by "
        "distillation (shipped)", _shipped_pruned("shapes-small")),
    "shapes-fast": ModelSpec(
        "shapes-fast", "shapes-small step-distilled to 4 steps with guidance built in: one "
        "UNet call per step (shipped)", _shipped_pruned("shapes-fast")),
    "shapes-latent": ModelSpec(
        "shapes-latent", "the latent UNet of the trained shapes-latent pipeline (16x16x4 "
        "latents; its autoencoder and text encoder in snapc/weights/shapes-latent; shipped)",
        _shapes_latent),
}


_WEIGHTS_STEM = "diffusion_pytorch_model"


def _weights_in_folder(folder: Path, fix: str = "point at a diffusers UNet folder") -> Path:
    """Return the weights file of a diffusers model folder: plain, sharded (the shard index)
    or a variant such as ``.fp16``, in that order; raise WeightsError ending in ``fix``."""
    for suffix in (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"):
        if (folder / f"{_WEIGHTS_STEM}{suffix}").is_file():
            return folder / f"{_WEIGHTS_STEM}{suffix}"
    variants = sorted(folder.glob(f"{_WEIGHTS_STEM}.*.safetensors"))
    if variants:
        return variants[0]
    raise WeightsError(f"{folder} has no {_WEIGHTS_STEM}.safetensors or .bin; {fix}")


def _read_folder_weights(weights: Path) -> dict[str, torch.Tensor]:
    """Read a folder's weights file, or every shard its ``*.index.json`` names."""
    if not weights.name.endswith(".index.json"):
        return read_state_dict(weights)
    try:
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise WeightsError(f"corrupt shard index {weights}: {exc}; re-save the model") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(read_state_dict(weights.parent / shard))
    return state


def _load_pruned(folder: Path, batch: int, latent: int | None, seed: int) -> LoadedModel:
    """Load a pruned-UNet folder (snapc.pruned): the full architecture with the kept weights,
    and the blocks to remove after tracing."""
    from snapc import pruned

    module, record = pruned.load_full_with_kept(folder, seed)
    clean = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    if is_shapes_family(record.base):
        from snapc.shapes import model as shapes_model

        if latent is not None and latent != clean["sample_size"]:
            raise WeightsError(f"model {record.name!r} is trained at 32x32; drop --latent {latent}")
        inputs = shapes_model.example_inputs(batch)
    elif is_latent_family(record.base):
        from snapc.shapes_latent.family import LATENT_SIZE, example_inputs, shipped_text_encoder

        if latent is not None and latent != LATENT_SIZE:
            raise WeightsError(f"model {record.name!r} samples {LATENT_SIZE}x{LATENT_SIZE} "
                               f"latents; drop --latent {latent}")
        inputs = example_inputs(batch, shipped_text_encoder())
    else:
        inputs = unet_example_inputs(clean, batch, latent, CONTEXT_LEN.get(record.base, 77),
                                     "cpu", seed)
    weights = folder / pruned.WEIGHTS_FILE
    info = ModelInfo(name=record.name, random_weights=record.random_weights, config=clean,
                     weights_path=str(weights), weights_sha256=file_sha256(weights),
                     base=record.base, removed=record.removed, sampler=record.sampler)
    return LoadedModel(module, inputs, info, removed=record.removed)


PIPELINE_INDEX = "model_index.json"


def _pipeline_unet(folder: Path) -> Path:
    """Return the ``unet/`` folder of a diffusers pipeline folder (what ``save_pretrained``
    of a pipeline writes); raise WeightsError naming what is missing and the fix."""
    index_path = folder / PIPELINE_INDEX
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"corrupt {index_path}: {exc}; fix or re-save the pipeline") from exc
    if not isinstance(index, dict):
        raise WeightsError(f"corrupt {index_path}: not a JSON object; re-save the pipeline")
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    unet = folder / "unet"
    if not (unet / "config.json").is_file():
        has = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_dir())) or "none"
        missing = "unet/config.json" if unet.is_dir() else "unet/"
        raise WeightsError(
            f"pipeline folder {folder} has no {missing} "
            f"(model_index.json lists {', '.join(listed) or 'nothing'}; folders: {has}); save "
            "the whole pipeline with save_pretrained, or point at a diffusers UNet folder")
    return unet


def _pipeline_context_len(folder: Path) -> int:
    """Return the text length a pipeline folder's UNet sees: its text encoder's
    ``max_position_embeddings`` (77 for SD's CLIP, also when text_encoder/ is absent)."""
    try:
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        return int(config.get("max_position_embeddings", 77))
    except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return 77  # no readable text encoder: SD's length (compiling it reports the problem)


def _load_folder(folder: Path, batch: int, latent: int | None, seed: int) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    from snapc.pruned import is_pruned_folder

    name = folder.name
    fix = "point at a diffusers UNet folder"
    context_len = 77
    if (folder / PIPELINE_INDEX).is_file() and not (folder / "config.json").is_file():
        context_len = _pipeline_context_len(folder)
        folder = _pipeline_unet(folder)
        fix = "save the whole pipeline again with save_pretrained"
    if is_pruned_folder(folder):
        return _load_pruned(folder, batch, latent, seed)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json; point at a diffusers UNet folder or "
                           f"a pipeline folder ({PIPELINE_INDEX} with unet/)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"corrupt {config_path}: {exc}; fix or re-save the file") from exc
    weights = _weights_in_folder(folder, fix)
    try:
        module = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # diffusers raises TypeError/ValueError on bad configs
        raise WeightsError(f"{config_path}: not a UNet2DConditionModel config ({exc})") from exc
    load_state_strict(module, _read_folder_weights(weights), weights)
    clean = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    inputs = unet_example_inputs(clean, batch, latent, context_len, "cpu", seed)
    info = ModelInfo(name=name, random_weights=False, config=clean,
                     weights_path=str(weights), weights_sha256=file_sha256(weights))
    return LoadedModel(module.eval(), inputs, info)


def _load_file(path: Path, arch: str | None, batch: int, latent: int | None, seed: int
               ) -> LoadedModel:
    """Load a weights file: diffusers parameter names with ``arch``, or an original Stable
    Diffusion checkpoint (snapc.checkpoints) whose architecture ``arch`` or its keys name."""
    from snapc import checkpoints

    archs = [m for m, spec in MODELS.items() if spec.config is not None]
    if arch is not None and arch not in archs:
        raise UnknownNameError("architecture", arch, archs)
    state = checkpoints.read_checkpoint(path)
    if checkpoints.is_ldm_unet(state):
        arch = arch or checkpoints.detect_arch(state, path)
        state = checkpoints.convert_ldm_unet(state, MODELS[arch].config, path)
    elif arch is None:
        raise WeightsError(f"{path} holds weights only; name its architecture with "
                           f"--arch ({', '.join(archs)})")
    base = MODELS[arch].build(batch, latent, torch.device("cpu"), seed)
    load_state_strict(base.module, state, path)
    info = ModelInfo(name=f"{arch}:{path.name}", random_weights=False, config=base.info.config,
                     weights_path=str(path), weights_sha256=file_sha256(path))
    return LoadedModel(base.module.eval(), base.example_inputs, info)


def load_model(
    model: str,
    *,
    arch: str | None = None,
    batch: int = 1,
    latent: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Return the module, example inputs and source info for MODEL (name, folder or file).

    ``device="meta"`` builds registered random-weight architectures without allocating weights
    (for inspection). Raises UnknownNameError or WeightsError with a one-line fix.
    """
    device = torch.device(device)
    path = Path(model)
    if model in MODELS:
        if device.type == "meta" and is_trained_family(model):
            device = torch.device("cpu")
        return MODELS[model].build(batch, latent, device, seed)
    if path.is_dir():
        return _load_folder(path, batch, latent, seed)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        if not path.exists():
            raise WeightsError(f"weights file not found: {path}")
        return _load_file(path, arch, batch, latent, seed)
    raise UnknownNameError("model", model, list(MODELS) + [
        "<diffusers UNet or pipeline folder>", "<original SD checkpoint.safetensors>",
        "<file.safetensors --arch NAME>"])
