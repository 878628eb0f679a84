"""Reading UNet weights, and the loaded-model record every model family returns.

Below the model registry (snapc.models) and the families it registers (snapc.shapes,
snapc.shapes_latent, pruned folders in snapc.pruned), so that each of them can use these
without importing the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from snapc.errors import WeightsError
from snapc.graph import ModelInfo

__all__ = ["LoadedModel", "file_sha256", "read_state_dict", "load_state_strict"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to trace: the module, example inputs and where it came from."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    info: ModelInfo
    removed: tuple[str, ...] = ()  # blocks to remove after tracing (a pruned-UNet folder)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
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
