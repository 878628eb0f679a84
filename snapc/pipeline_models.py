"""The text encoder, tokenizer and VAE of a Stable Diffusion pipeline, for `--components`.

Two sources, both offline:

* named random-weight pipelines (:data:`PIPELINES`): ``sd15-pipeline`` (the SD-1.5 layout:
  its UNet, the CLIP ViT-L/14 text encoder and the AutoencoderKL of SD-1.5's public configs)
  and ``tiny-pipeline`` (the same layout, small, for tests); their tokenizer is snapc's
  offline one (:func:`snapc.clip_text.build_tokenizer`);
* diffusers pipeline folders (``model_index.json`` with ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``vae/``), read with ``from_pretrained(local_files_only=True)``.

:func:`pipeline_components` says which components a model has without loading weights (so a
missing one is a one-line error before anything compiles); :func:`load_text_encoder` and
:func:`load_vae` load them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.errors import SnapcError, WeightsError

__all__ = ["PipelineSpec", "PIPELINES", "CLIP_SD15_CONFIG", "VAE_SD15_CONFIG",
           "TINY_CLIP_CONFIG", "TINY_VAE_CONFIG", "TextEncoderParts", "pipeline_components",
           "is_pipeline", "require_component", "load_text_encoder", "load_vae",
           "write_random_pipeline"]

# Exact public config of runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14
# text tower, 123 M params).
CLIP_SD15_CONFIG: dict = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# Exact public config of runwayml/stable-diffusion-v1-5 vae/config.json (AutoencoderKL, 83.7 M
# params; the decoder 49.5 M).
VAE_SD15_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# Small versions of the same layout for tests (context 16 x 32 = the tiny UNet's).
TINY_CLIP_CONFIG: dict = {
    **CLIP_SD15_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 16, "projection_dim": 32,
}
TINY_VAE_CONFIG: dict = {
    **VAE_SD15_CONFIG, "layers_per_block": 1, "block_out_channels": [32, 64],
    "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 32,
}


@dataclass(frozen=True)
class PipelineSpec:
    """A named random-weight pipeline: its UNet (a registered model) and the configs of its
    text encoder and VAE."""

    name: str
    unet: str
    clip: dict
    vae: dict


PIPELINES: dict[str, PipelineSpec] = {
    "sd15-pipeline": PipelineSpec("sd15-pipeline", "sd15", CLIP_SD15_CONFIG, VAE_SD15_CONFIG),
    "tiny-pipeline": PipelineSpec("tiny-pipeline", "tiny", TINY_CLIP_CONFIG, TINY_VAE_CONFIG),
}
_INDEX = "model_index.json"
_FOLDERS = {"text_encoder": ("text_encoder", "tokenizer"), "vae_decoder": ("vae",)}


@dataclass(frozen=True)
class TextEncoderParts:
    """A loaded CLIP text encoder, its tokenizer and the token length it takes."""

    module: nn.Module
    tokenizer: Any
    max_length: int
    random_weights: bool


def is_pipeline(model: str) -> bool:
    """Return whether MODEL is a named pipeline or a diffusers pipeline folder."""
    return model in PIPELINES or (Path(model) / _INDEX).is_file()


def pipeline_components(model: str) -> tuple[str, ...]:
    """Return the components MODEL has besides its UNet ("text_encoder", "vae_decoder"),
    looking only at names and folders (no weights are read)."""
    if model in PIPELINES:
        return tuple(_FOLDERS)
    folder = Path(model)
    if not (folder / _INDEX).is_file():
        return ()
    return tuple(c for c, subs in _FOLDERS.items()
                 if all((folder / s).is_dir() for s in subs))


def missing_folder(model: str, component: str) -> str | None:
    """Return the first sub-folder a pipeline folder lacks for ``component``, else None."""
    folder = Path(model)
    for sub in _FOLDERS[component]:
        if not (folder / sub / ("config.json" if sub != "tokenizer" else "")).exists():
            return f"{sub}/"
    return None


def _seeded(seed: int, build: Any) -> Any:
    torch.manual_seed(seed)
    return build()


def _from_folder(cls: Any, folder: Path, what: str) -> Any:
    """Return ``cls.from_pretrained(folder)`` offline; raise WeightsError naming the folder."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise WeightsError(f"cannot read the {what} in {folder} ({type(exc).__name__}: "
                           f"{first}); re-save the pipeline with save_pretrained") from exc


def load_text_encoder(model: str, seed: int = 0) -> TextEncoderParts:
    """Return MODEL's CLIP text encoder and tokenizer: random weights (seeded) for a named
    pipeline, else the folder's ``text_encoder/`` and ``tokenizer/``. Raises SnapcError for a
    model without them and WeightsError for unreadable ones."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from snapc.clip_text import build_tokenizer

    if model in PIPELINES:
        config = CLIPTextConfig(**PIPELINES[model].clip)
        module = _seeded(seed, lambda: CLIPTextModel(config))
        length = int(config.max_position_embeddings)
        return TextEncoderParts(module.eval(), build_tokenizer(length), length, True)
    require_component(model, "text_encoder")
    folder = Path(model)
    config_path = folder / "text_encoder" / "config.json"
    try:
        arch = (json.loads(config_path.read_text()).get("architectures") or ["CLIPTextModel"])[0]
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"corrupt {config_path}: {exc}; re-save the pipeline") from exc
    if arch != "CLIPTextModel":
        raise SnapcError(f"{folder}/text_encoder is a {arch}; snapc compiles CLIPTextModel text "
                         "encoders (SD 1.x / 2.x); drop text_encoder from --components")
    module = _from_folder(CLIPTextModel, folder / "text_encoder", "text encoder")
    tokenizer = _from_folder(CLIPTokenizer, folder / "tokenizer", "tokenizer")
    length = int(module.config.max_position_embeddings)
    return TextEncoderParts(module.eval(), tokenizer, length, False)


def load_vae(model: str, seed: int = 0) -> tuple[nn.Module, bool]:
    """Return (AutoencoderKL, random_weights) of MODEL: seeded random weights for a named
    pipeline, else the folder's ``vae/`` (a compressed decoder, with ``snapc_decoder.json``,
    through :func:`snapc.decoder.load_compressed_vae`). Raises SnapcError for a model without
    one or an unreadable one."""
    from diffusers import AutoencoderKL

    from snapc.decoder.io import is_compressed_folder, load_compressed_vae

    if model in PIPELINES:
        config = PIPELINES[model].vae
        return _seeded(seed, lambda: AutoencoderKL(**config)).eval(), True
    require_component(model, "vae_decoder")
    folder = Path(model) / "vae"
    if is_compressed_folder(folder):  # from_pretrained cannot express its pruned widths
        return load_compressed_vae(folder), False
    return _from_folder(AutoencoderKL, folder, "VAE").eval(), False


def require_component(model: str, component: str) -> None:
    """Raise SnapcError (one line, naming the fix) when MODEL has no ``component``."""
    if not is_pipeline(model):
        raise SnapcError(f"model '{model}' has no {component.replace('_', ' ')} snapc can "
                         f"compile; give a pipeline folder ({_INDEX} with "
                         f"{' and '.join(s + '/' for s in _FOLDERS[component])}) or one of "
                         f"{', '.join(PIPELINES)}, or drop {component} from --components")
    missing = missing_folder(model, component)
    if missing is not None:
        has = ", ".join(sorted(p.name for p in Path(model).iterdir() if p.is_dir())) or "none"
        raise SnapcError(f"pipeline folder {model} has no {missing} (folders: {has}), needed "
                         f"for {component}; save the whole pipeline with save_pretrained or "
                         f"drop {component} from --components")


def write_random_pipeline(name: str, folder: Path, seed: int = 0) -> Path:
    """Write the named random-weight pipeline as a diffusers pipeline folder (unet/,
    text_encoder/, tokenizer/, vae/, scheduler/, model_index.json); return ``folder``."""
    from diffusers import DDIMScheduler

    from snapc.models import load_model

    if name not in PIPELINES:
        raise SnapcError(f"unknown pipeline '{name}'; valid: {', '.join(PIPELINES)}")
    folder = Path(folder)
    load_model(PIPELINES[name].unet, seed=seed).module.save_pretrained(folder / "unet")
    text = load_text_encoder(name, seed)
    text.module.save_pretrained(folder / "text_encoder")
    text.tokenizer.save_pretrained(folder / "tokenizer")
    load_vae(name, seed)[0].save_pretrained(folder / "vae")
    DDIMScheduler().save_pretrained(folder / "scheduler")
    (folder / _INDEX).write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        indent=2))
    return folder
