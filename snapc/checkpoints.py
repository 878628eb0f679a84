"""Single-file checkpoints: the original Stable Diffusion layout that diffusers reads with
``from_single_file``, loaded offline with a config from snapc's named configs.

An original (LDM / CompVis) checkpoint keeps the UNet under ``model.diffusion_model.*``
(``input_blocks.N``, ``middle_block``, ``output_blocks.N``, ``label_emb`` for SDXL) next to the
text encoder and VAE. Which named config fits is read from the UNet's keys alone:

* ``sdxl``: ``label_emb.*`` (added conditioning) and 2048-wide text states;
* ``sd21-base``: 1024-wide text states and linear ``proj_in`` (SD 2.x, 512 or 768);
* ``sd15``: 768-wide text states and 1x1-conv ``proj_in`` (SD 1.x).

Anything else is a WeightsError naming what was found and the fix (``--arch``). The keys are
converted with diffusers' own ``convert_ldm_unet_checkpoint``, and every tensor of the
checkpoint's UNet must land on a key of the config (the caller loads them strictly).
"""

from __future__ import annotations

from pathlib import Path

import torch

from snapc.errors import WeightsError

__all__ = ["LDM_UNET_PREFIX", "read_checkpoint", "is_ldm_unet", "detect_arch",
           "ldm_features", "convert_ldm_unet"]

LDM_UNET_PREFIX = "model.diffusion_model."
# The named configs an original-layout UNet can be: (text width, linear proj_in, label_emb).
_KNOWN = {(768, False, False): "sd15", (1024, True, False): "sd21-base",
          (2048, True, True): "sdxl"}


def _corrupt(path: Path, exc: Exception) -> WeightsError:
    return WeightsError(f"corrupt weights file {path}: {str(exc).splitlines()[0][:160]}; "
                        "re-save or re-download it")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a weights file; of an original-layout checkpoint only its UNet's
    (``model.diffusion_model.*``: a .safetensors file's text encoder and VAE are not read).

    A ``.ckpt``'s ``state_dict`` entry is unwrapped. Raises WeightsError naming the file.
    """
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}; pass an existing file or folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
                    keys = [k for k in keys if k.startswith(LDM_UNET_PREFIX)]
                return {k: handle.get_tensor(k) for k in keys}
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several unrelated types
        raise _corrupt(path, exc) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict; save one with torch.save")
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    return state


def is_ldm_unet(state: dict[str, torch.Tensor]) -> bool:
    """Return whether ``state`` holds an original-layout UNet (``model.diffusion_model.*``)."""
    return any(k.startswith(LDM_UNET_PREFIX) for k in state)


def ldm_features(state: dict[str, torch.Tensor]) -> tuple[int | None, bool, bool]:
    """Return (text-state width, linear proj_in, added conditioning) of an original-layout
    UNet: the input width of the first cross-attention key projection, whether the first
    ``proj_in`` weight is a matrix (a 1x1 conv is 4-D), and whether ``label_emb`` is there."""
    keys = sorted(state)
    to_k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    width = int(state[to_k].shape[1]) if to_k else None
    linear = proj is not None and state[proj].dim() == 2
    return width, linear, any(k.startswith(LDM_UNET_PREFIX + "label_emb.") for k in keys)


def detect_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """Return the named config of an original-layout UNet (see the module docstring); raise
    WeightsError naming what the checkpoint holds when it is none of them."""
    width, linear, added = ldm_features(state)
    conv_in = state.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    channels = int(conv_in.shape[1]) if conv_in is not None else None
    arch = _KNOWN.get((width, linear, added)) if channels == 4 else None
    if arch is None:
        known = "; ".join(f"{name} ({w}-wide text, {'linear' if lin else 'conv'} proj_in"
                          f"{', label_emb' if lab else ''})"
                          for (w, lin, lab), name in _KNOWN.items())
        raise WeightsError(
            f"{path}: original-layout UNet of a layout snapc does not know ({width}-wide text "
            f"states, {'linear' if linear else 'conv'} proj_in, "
            f"{'with' if added else 'no'} label_emb, {channels} input channels); snapc knows "
            f"{known}: name its architecture with --arch or convert it to a diffusers folder")
    return arch


def convert_ldm_unet(state: dict[str, torch.Tensor], config: dict, path: Path
                     ) -> dict[str, torch.Tensor]:
    """Return the diffusers state dict of an original-layout UNet for ``config``, converted
    by diffusers' ``convert_ldm_unet_checkpoint``; raise WeightsError when a tensor the config
    needs is missing or one of the checkpoint's UNet tensors has no place in it."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    try:
        converted = convert_ldm_unet_checkpoint(state, dict(config))
    except KeyError as exc:  # the converter indexes the keys the config's embeddings need
        raise WeightsError(f"{path}: missing key '{LDM_UNET_PREFIX}{exc.args[0]}' that the "
                           "architecture needs; check --arch") from exc
    converted = {k: v for k, v in converted.items() if v is not None}
    if len(converted) != len(state):
        used = {id(v) for v in converted.values()}
        left = sorted(k for k, v in state.items() if id(v) not in used)
        first = left[0] if left else "?"
        raise WeightsError(f"{path}: {len(state) - len(converted)} UNet tensor(s) of the "
                           f"checkpoint have no place in the architecture (first: '{first}'); "
                           "check --arch")
    return converted
