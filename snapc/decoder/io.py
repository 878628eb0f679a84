"""Load autoencoders to compress, and write / read compressed-decoder folders.

A compressed-decoder folder is a diffusers ``AutoencoderKL`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, written by diffusers' ``save_pretrained``) whose
decoder has fewer channels than the config says, plus ``snapc_decoder.json`` (format
``snapc-decoder/1``: the shape of every decoder Conv2d / Linear / GroupNorm, the pruning
record, MACs and params) and ``training.json`` when it was distilled. diffusers' config cannot
express it: a ``ResnetBlock2D``'s inner width is always its output width, and
``block_out_channels`` is shared with the encoder, so ``AutoencoderKL.from_pretrained`` on the
folder reports shape mismatches. :func:`load_compressed_vae` builds the ``AutoencoderKL`` from
the config with diffusers, resizes the decoder to the saved layout and loads the weights
strictly: the result is a plain diffusers ``AutoencoderKL`` instance
(``pipe.vae = load_compressed_vae(DIR)``). A folder pruned at keep 1.0 is an ordinary
diffusers folder that ``from_pretrained`` loads as it is.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.decoder.prune import PruneRecord, apply_layout, module_layout
from snapc.errors import UnknownNameError, WeightsError

__all__ = ["FORMAT", "LoadedVae", "VAE_NAMES", "SD_VAE_CONFIG", "load_vae",
           "load_compressed_vae", "save_compressed", "is_compressed_folder"]

FORMAT = "snapc-decoder/1"
META = "snapc_decoder.json"

# Stable Diffusion 1.x's VAE architecture (diffusers' config of runwayml/stable-diffusion-v1-5
# vae/), for random-weight cost figures at SD scale; nothing is downloaded.
SD_VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215,
}


@dataclass
class LoadedVae:
    """An autoencoder to compress, where it came from and whether its weights are random."""

    vae: nn.Module
    name: str
    random_weights: bool
    latent_hw: tuple[int, int]  # the latent resolution the decoder is measured and trained at


def _random(config: dict, name: str, latent: int) -> LoadedVae:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    warnings.warn(f"'{name}' has random weights (an architecture, not a trained model)",
                  UserWarning, stacklevel=3)
    return LoadedVae(AutoencoderKL(**config).eval(), name, True, (latent, latent))


def _shapes_latent() -> LoadedVae:
    from snapc.shapes_latent.config import LATENT_SIZE, WEIGHTS_DIR

    folder = WEIGHTS_DIR / "vae"
    if not (folder / "config.json").is_file():
        raise WeightsError(f"shapes-latent is not trained yet ({folder} missing); run "
                           "`python bench/train_shapes_latent.py vae --minutes M` on a GPU, or "
                           "use tiny-vae for a random-weight run")
    return LoadedVae(_from_folder(folder), "shapes-latent", False, (LATENT_SIZE, LATENT_SIZE))


def _tiny() -> LoadedVae:
    from snapc.shapes_latent.config import LATENT_SIZE, VAE_CONFIG

    return _random(VAE_CONFIG, "tiny-vae", LATENT_SIZE)


def _sd() -> LoadedVae:
    return _random(SD_VAE_CONFIG, "sd-vae", 64)


VAE_NAMES = {"shapes-latent": _shapes_latent, "tiny-vae": _tiny, "sd-vae": _sd}


def is_compressed_folder(path: Path) -> bool:
    """Return whether ``path`` is a compressed-decoder folder (it has snapc_decoder.json)."""
    return (path / META).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {path} ({exc}); re-write the folder") from None


def _from_folder(folder: Path) -> nn.Module:
    from diffusers import AutoencoderKL

    config = _read_json(folder / "config.json")
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise WeightsError(f"{folder} holds a {config.get('_class_name')}, not an "
                           "AutoencoderKL; pass an AutoencoderKL folder or a pipeline folder")
    if is_compressed_folder(folder):
        return load_compressed_vae(folder)
    from safetensors import SafetensorError

    try:
        return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).float().eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot load the AutoencoderKL in {folder}: {first}") from None


def load_vae(model: str) -> LoadedVae:
    """Return the autoencoder ``model`` names: ``shapes-latent``, ``tiny-vae`` (its
    architecture, random), ``sd-vae`` (SD 1.x's, random), an AutoencoderKL folder, a pipeline
    folder with ``vae/``, or a compressed-decoder folder. Raises a one-line SnapcError."""
    if model in VAE_NAMES:
        return VAE_NAMES[model]()
    path = Path(model)
    if not path.exists():
        raise UnknownNameError("autoencoder", model, list(VAE_NAMES) + ["<folder>"])
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{path} has no config.json (nor vae/config.json); pass a diffusers "
                           "AutoencoderKL or pipeline folder")
    vae = _from_folder(folder)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = int(vae.config.sample_size if isinstance(vae.config.sample_size, int)
               else vae.config.sample_size[0]) // factor
    return LoadedVae(vae, str(path), False, (side, side))


def load_compressed_vae(folder: str | Path) -> nn.Module:
    """Return the diffusers ``AutoencoderKL`` of a compressed-decoder folder (eval mode, fp32).

    Raises WeightsError when a file is missing or corrupt or the weights do not fit the layout.
    """
    from diffusers import AutoencoderKL
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_json(folder / META)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{folder / META} is not a {FORMAT} record; re-run "
                           "`snapc compress-decoder`")
    config = _read_json(folder / "config.json")
    vae = apply_layout(AutoencoderKL.from_config(config), meta["layout"])
    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"cannot read {weights} ({exc}); re-run `snapc compress-decoder`") \
            from None
    try:
        vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights} does not fit the layout in {META} "
                           f"({str(exc).splitlines()[0]}); re-run `snapc compress-decoder`") \
            from None
    return vae.eval()


def save_compressed(vae: nn.Module, record: PruneRecord, folder: Path,
                    extra: dict[str, Any], training: dict[str, Any] | None = None) -> None:
    """Write ``vae`` (compressed decoder) into the existing empty ``folder``: diffusers config
    and safetensors weights, ``snapc_decoder.json`` (layout, record, ``extra``) and
    ``training.json`` when ``training`` is given. The caller makes the folder atomic."""
    vae.save_pretrained(folder, safe_serialization=True)
    meta = {"format": FORMAT, "layout": module_layout(vae), "pruning": record.to_json(),
            **extra}
    (folder / META).write_text(json.dumps(meta, indent=1, default=str))
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training, indent=1, default=str))
