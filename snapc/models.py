"""Named UNet architectures and weight loading: what `snapc compile MODEL` accepts.

MODEL is a registered name (``sd15``, ``sd21-base``, ``tiny``, ``shapes``), a diffusers UNet
folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), or a
``.safetensors`` file together with ``arch=`` a registered name. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from snapc.errors import UnknownNameError, WeightsError
from snapc.graph import ModelInfo

__all__ = [
    "ModelSpec",
    "LoadedModel",
    "MODELS",
    "load_model",
    "unet_example_inputs",
    "SD15_CONFIG",
    "SD21_BASE_CONFIG",
    "TINY_CONFIG",
    "read_state_dict",
    "load_state_strict",
    "is_shapes_family",
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

CONTEXT_LEN = {"sd15": 77, "sd21-base": 77, "tiny": 16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to trace: the module, example inputs and where it came from."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    info: ModelInfo
    removed: tuple[str, ...] = ()  # blocks to remove after tracing (a pruned-UNet folder)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name: how to build it and whether its weights are random."""

    name: str
    description: str
    build: Callable[[int, int | None, torch.device, int], LoadedModel]


def unet_example_inputs(
    config: dict, batch: int, latent: int | None, context_len: int,
    device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return seeded (sample, timestep, encoder_hidden_states) for a diffusers UNet config."""
    size = latent or int(config.get("sample_size") or 64)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.get("in_channels", 4), size, size, generator=gen)
    timestep = torch.full((batch,), 500.0)
    dim = config["cross_attention_dim"]
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    context = torch.randn(batch, context_len, dim, generator=gen)
    return sample.to(device), timestep.to(device), context.to(device)


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
                     weights_path=str(weights), weights_sha256=_file_sha256(weights))
    return LoadedModel(module.to(device), tuple(t.to(device) for t in inputs), info)


MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "Stable Diffusion v1.5 UNet, 859.5 M params (random weights)",
                      _random_unet("sd15", SD15_CONFIG)),
    "sd21-base": ModelSpec("sd21-base", "Stable Diffusion 2.1-base UNet (random weights)",
                           _random_unet("sd21-base", SD21_BASE_CONFIG)),
    "tiny": ModelSpec("tiny", "small SD-shaped UNet for tests (random weights)",
                      _random_unet("tiny", TINY_CONFIG)),
    "shapes": ModelSpec("shapes", "trained 32x32 text-to-image reference model (shipped)",
                        _shapes),
}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .bin state dict, raising WeightsError naming the file."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}; pass an existing file or folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several unrelated types
        raise WeightsError(
            f"corrupt weights file {path}: {str(exc).splitlines()[0][:160]}; "
            "re-save or re-download it") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict; save one with torch.save")
    return state


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` strictly, raising WeightsError that names the file and first bad key."""
    expected = module.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise WeightsError(f"{path}: unexpected key '{key}' (not in the architecture); "
                               "check the model config or --arch")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{path}: key '{key}' has shape {list(tensor.shape)}, the architecture "
                f"expects {list(expected[key].shape)}; check the model config or --arch")
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{path}: missing key '{missing[0]}' ({len(missing)} missing); "
                           "the file is incomplete or for another architecture")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _weights_in_folder(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin; "
                       "point at a diffusers UNet folder")


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
    else:
        inputs = unet_example_inputs(clean, batch, latent, CONTEXT_LEN.get(record.base, 77),
                                     "cpu", seed)
    weights = folder / pruned.WEIGHTS_FILE
    info = ModelInfo(name=record.name, random_weights=record.random_weights, config=clean,
                     weights_path=str(weights), weights_sha256=_file_sha256(weights),
                     base=record.base, removed=record.removed, sampler=record.sampler)
    return LoadedModel(module, inputs, info, removed=record.removed)


def is_shapes_family(name: str) -> bool:
    """Return whether a model (or base) name is the shapes model or one derived from it."""
    return name == "shapes" or name.startswith("shapes-")


def _load_folder(folder: Path, batch: int, latent: int | None, seed: int) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    from snapc.pruned import is_pruned_folder

    if is_pruned_folder(folder):
        return _load_pruned(folder, batch, latent, seed)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json; point at a diffusers UNet folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"corrupt {config_path}: {exc}; fix or re-save the file") from exc
    weights = _weights_in_folder(folder)
    try:
        module = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # diffusers raises TypeError/ValueError on bad configs
        raise WeightsError(f"{config_path}: not a UNet2DConditionModel config ({exc})") from exc
    load_state_strict(module, read_state_dict(weights), weights)
    clean = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    inputs = unet_example_inputs(clean, batch, latent, 77, "cpu", seed)
    info = ModelInfo(name=folder.name, random_weights=False, config=clean,
                     weights_path=str(weights), weights_sha256=_file_sha256(weights))
    return LoadedModel(module.eval(), inputs, info)


def _load_file(path: Path, arch: str, batch: int, latent: int | None, seed: int) -> LoadedModel:
    if arch not in MODELS or arch == "shapes":
        raise UnknownNameError("architecture", arch, [m for m in MODELS if m != "shapes"])
    base = MODELS[arch].build(batch, latent, torch.device("cpu"), seed)
    load_state_strict(base.module, read_state_dict(path), path)
    info = ModelInfo(name=f"{arch}:{path.name}", random_weights=False, config=base.info.config,
                     weights_path=str(path), weights_sha256=_file_sha256(path))
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
        if device.type == "meta" and model == "shapes":
            device = torch.device("cpu")
        return MODELS[model].build(batch, latent, device, seed)
    if path.is_dir():
        return _load_folder(path, batch, latent, seed)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        if not path.exists():
            raise WeightsError(f"weights file not found: {path}")
        if arch is None:
            raise WeightsError(f"{path} holds weights only; name its architecture with "
                               f"--arch ({', '.join(m for m in MODELS if m != 'shapes')})")
        return _load_file(path, arch, batch, latent, seed)
    raise UnknownNameError("model", model, list(MODELS) + ["<diffusers folder>",
                                                          "<file.safetensors --arch NAME>"])
