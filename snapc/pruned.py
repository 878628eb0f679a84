"""Pruned UNets as modules and folders that snapc and diffusers both load.

A pruned UNet is a diffusers ``UNet2DConditionModel`` whose removed blocks are replaced by
their skip path, exactly what ``RemoveBlocks`` does to a graph: a ResNet block becomes its
``conv_shortcut`` (or the identity) divided by its output scale factor, a transformer block
the identity on its hidden states. The skip modules keep diffusers' parameter names
(``down_blocks.1.resnets.1.conv_shortcut.weight``), so a pruned module's state dict is the
base model's minus the removed blocks' own weights.

A pruned-UNet folder holds::

    config.json                           the base diffusers UNet config
    diffusion_pytorch_model.safetensors   the kept weights, diffusers parameter names
    snapc_pruned.json                     format, name, base model, removed blocks, sampler,
                                          random_weights, training record pointer

``load_pruned_unet(folder)`` returns the diffusers module with skips in place (for a
diffusers pipeline: ``pipe.unet = load_pruned_unet(folder)``); ``snapc compile FOLDER``
traces the full architecture and removes the same blocks as a pass, so the block map, cost
model and every target see a normal pruned graph.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.errors import SnapcError, UnknownNameError, WeightsError

__all__ = [
    "FORMAT",
    "RECORD_FILE",
    "WEIGHTS_FILE",
    "PrunedRecord",
    "SkipResnet",
    "SkipTransformer",
    "removable_blocks",
    "skip_blocks",
    "skip_path",
    "check_removable",
    "kept_state_dict",
    "is_pruned_folder",
    "read_record",
    "save_pruned",
    "load_pruned_unet",
    "load_full_with_kept",
]

FORMAT = "snapc-pruned-unet/1"
RECORD_FILE = "snapc_pruned.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class SkipResnet(nn.Module):
    """A removed ResNet block: its shortcut alone, ``conv_shortcut(x) / output_scale_factor``
    (the identity when it has no shortcut conv), as ``RemoveBlocks`` rewires the graph."""

    def __init__(self, conv_shortcut: nn.Module | None, output_scale_factor: float = 1.0) -> None:
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.output_scale_factor = float(output_scale_factor)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the shortcut path of ``input_tensor``."""
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return x if self.output_scale_factor == 1.0 else x / self.output_scale_factor


class SkipTransformer(nn.Module):
    """A removed ``Transformer2DModel``: the identity on hidden_states, in diffusers' tuple
    form (what ``return_dict=False`` callers unpack)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Return ``(hidden_states,)``, or an output object when ``return_dict`` is asked."""
        if kwargs.get("return_dict", False):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


def _stages(unet: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    stages = [(f"down_blocks.{i}", b, False) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        stages.append(("mid_block", unet.mid_block, True))
    stages += [(f"up_blocks.{i}", b, False) for i, b in enumerate(unet.up_blocks)]
    return stages


def removable_blocks(unet: nn.Module) -> list[str]:
    """Return the names of every ResNet and transformer block of a diffusers UNet, in
    execution order (a mid block runs resnet 0, its attentions, then the other resnets)."""
    names = []
    for prefix, block, is_mid in _stages(unet):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            names.append(f"{prefix}.resnets.{i}")
            if is_mid and i == 0:
                names += [f"{prefix}.attentions.{j}" for j in range(len(attentions))]
            elif not is_mid and i < len(attentions):
                names.append(f"{prefix}.attentions.{i}")
    return names


def _check_names(unet: nn.Module, names: Iterable[str]) -> list[str]:
    known = removable_blocks(unet)
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        if name not in known:
            raise UnknownNameError("block", name, known)
    return wanted


def skip_path(name: str, block: nn.Module) -> nn.Module:
    """Return the skip module that replaces block ``name`` (a skip is returned as it is);
    a new SkipResnet shares the block's shortcut conv."""
    if isinstance(block, (SkipResnet, SkipTransformer)):
        return block
    if ".resnets." in name:
        return SkipResnet(getattr(block, "conv_shortcut", None),
                          getattr(block, "output_scale_factor", 1.0))
    return SkipTransformer()


def skip_blocks(unet: nn.Module, names: Iterable[str], *, in_place: bool = False) -> nn.Module:
    """Return ``unet`` with the named blocks replaced by their skip path.

    ``in_place=False`` (the default) edits a deep copy and leaves ``unet`` unchanged; the
    shortcut convs of removed ResNets are shared with nothing. Unknown names raise
    UnknownNameError listing the removable ones.
    """
    wanted = _check_names(unet, names)
    edited = unet if in_place else copy.deepcopy(unet)
    for name in wanted:
        parent_name, _, index = name.rpartition(".")
        parent = edited.get_submodule(parent_name)
        parent[int(index)] = skip_path(name, parent[int(index)])
    return edited


def kept_state_dict(pruned: nn.Module) -> dict[str, torch.Tensor]:
    """Return the pruned module's state dict (diffusers names, removed blocks' weights gone)."""
    return {k: v.detach() for k, v in pruned.state_dict().items()}


@dataclass(frozen=True)
class PrunedRecord:
    """What ``snapc_pruned.json`` says: the model's name, its base and the blocks removed.

    ``sampler`` is the sampling recipe the weights were trained for (None: the base model's
    default); ``training`` names the training record file, if any.
    """

    name: str
    base: str
    removed: tuple[str, ...]
    random_weights: bool
    sampler: dict | None = None
    training: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready record."""
        return {"format": FORMAT, "name": self.name, "base": self.base,
                "removed_blocks": list(self.removed), "random_weights": self.random_weights,
                "sampler": self.sampler, "training": self.training, **self.extra}


def is_pruned_folder(path: str | Path) -> bool:
    """Return whether ``path`` is a folder holding a ``snapc_pruned.json`` record."""
    return (Path(path) / RECORD_FILE).is_file()


def read_record(folder: str | Path) -> PrunedRecord:
    """Return the folder's PrunedRecord; WeightsError names a missing or corrupt record."""
    path = Path(folder) / RECORD_FILE
    try:
        data = json.loads(path.read_text())
        if not str(data.get("format", "")).startswith("snapc-pruned-unet/"):
            raise ValueError(f"format is {data.get('format')!r}")
        known = {"format", "name", "base", "removed_blocks", "random_weights", "sampler",
                 "training"}
        return PrunedRecord(name=str(data["name"]), base=str(data["base"]),
                            removed=tuple(data["removed_blocks"]),
                            random_weights=bool(data["random_weights"]),
                            sampler=data.get("sampler"), training=data.get("training"),
                            extra={k: v for k, v in data.items() if k not in known})
    except FileNotFoundError as exc:
        raise WeightsError(f"{folder} has no {RECORD_FILE}; write it with snapc distill") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"corrupt {path} ({exc}); re-run snapc distill to rewrite it") from exc


def save_pruned(folder: Path, pruned: nn.Module, config: Mapping[str, Any],
                record: PrunedRecord, *, dtype: torch.dtype = torch.float16) -> None:
    """Write the pruned-UNet folder (config, weights as ``dtype``, record) into ``folder``.

    ``folder`` must exist (callers write into an atomic temp folder and rename it).
    """
    from safetensors.torch import save_file

    clean = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    (folder / "config.json").write_text(json.dumps(clean, indent=1, default=list))
    state = {k: v.to(dtype).contiguous().cpu() for k, v in kept_state_dict(pruned).items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=1))


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"{folder} has no config.json; re-run snapc distill") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"corrupt {path}: {exc}; re-run snapc distill") from exc


def _build(config: dict, path: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_config(config)
    except Exception as exc:  # diffusers raises TypeError/ValueError on bad configs
        raise WeightsError(f"{path}: not a UNet2DConditionModel config ({exc})") from exc


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from snapc.model_io import read_state_dict

    return {k: v.float() for k, v in read_state_dict(folder / WEIGHTS_FILE).items()}


def load_pruned_unet(folder: str | Path) -> nn.Module:
    """Return the folder's diffusers ``UNet2DConditionModel`` with its removed blocks as skips
    (fp32, eval mode); use it as ``pipe.unet`` in a diffusers pipeline."""
    from snapc.model_io import load_state_strict

    folder = Path(folder)
    record = read_record(folder)
    unet = skip_blocks(_build(_read_config(folder), folder), record.removed, in_place=True)
    load_state_strict(unet, _read_weights(folder), folder / WEIGHTS_FILE)
    return unet.eval()


def load_full_with_kept(folder: str | Path, seed: int = 0) -> tuple[nn.Module, PrunedRecord]:
    """Return the full base architecture holding the folder's kept weights, and its record.

    The removed blocks' own weights are seeded placeholders: the caller removes those blocks
    (``RemoveBlocks(record.removed)``), after which nothing reads them. Used by ``snapc
    compile FOLDER`` so the graph has a complete block map.
    """
    folder = Path(folder)
    record = read_record(folder)
    torch.manual_seed(seed)
    full = _build(_read_config(folder), folder)
    _check_names(full, record.removed)
    state = _read_weights(folder)
    expected = set(kept_state_dict(skip_blocks(full, record.removed)))
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        bad = missing[0] if missing else extra[0]
        raise WeightsError(f"{folder / WEIGHTS_FILE}: {'missing' if missing else 'unexpected'}"
                           f" key '{bad}' for the removed blocks in {RECORD_FILE}; "
                           "the folder is incomplete or was edited")
    full_state = full.state_dict()
    full_state.update(state)
    full.load_state_dict(full_state)
    return full.eval(), record


def check_removable(unet: nn.Module, names: Iterable[str]) -> list[str]:
    """Return the names de-duplicated; raise UnknownNameError for a name that is no block."""
    wanted = _check_names(unet, names)
    if not wanted:
        raise SnapcError("no block to remove; name blocks with --remove or give --budget")
    return wanted
