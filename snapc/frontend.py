"""Trace a module to a Graph with torch.export (fx.symbolic_trace fails on diffusers UNets).

A module that does not export is a TraceError naming the innermost module of the model that
was running when export failed (its class and path), never a traceback.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence

import torch
from torch import nn

from snapc.blocks import RESNET, classify_module_type
from snapc.errors import SnapcError, TraceError
from snapc.graph import Graph, ModelInfo

__all__ = ["trace", "UNET_INPUTS", "UNET_ADDED_INPUTS"]

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
# SDXL's added conditioning (addition_embed_type "text_time"): pooled text embeds and size ids.
UNET_ADDED_INPUTS = ("text_embeds", "time_ids")


class _UNetEntry(nn.Module):
    """Calls a diffusers UNet with positional inputs and returns the noise prediction tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.net(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _AddedCondUNetEntry(nn.Module):
    """Calls an SDXL-class diffusers UNet: positional inputs, the added conditioning passed as
    ``added_cond_kwargs``; returns the noise prediction tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor, time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.net(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                        return_dict=False)[0]


class _ModuleEntry(nn.Module):
    """Calls any module and returns its first output when it returns a tuple or list."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.net(*args)
        return out[0] if isinstance(out, (tuple, list)) else out


def _is_diffusers_unet(module: nn.Module) -> bool:
    return type(module).__name__ == "UNet2DConditionModel"


def _unet_entry(module: nn.Module, n_inputs: int) -> tuple[nn.Module, tuple[str, ...]]:
    """Return the entry wrapper of a diffusers UNet and its input names; raise TraceError when
    the example inputs do not fit its conditioning."""
    embed_type = getattr(module.config, "addition_embed_type", None)
    added = embed_type == "text_time"
    names = UNET_INPUTS + UNET_ADDED_INPUTS if added else UNET_INPUTS
    if n_inputs != len(names):
        raise TraceError(
            f"UNet2DConditionModel (addition_embed_type {embed_type!r}) takes "
            f"{len(names)} inputs ({', '.join(names)}), got {n_inputs}; build them with "
            "snapc.models.unet_example_inputs(config, ...)")
    return (_AddedCondUNetEntry(module) if added else _UNetEntry(module)), names


def _failing_module(exc: BaseException, model: nn.Module) -> tuple[str, str] | None:
    """Return (class name, path) of the innermost module of ``model`` whose code was running
    when ``exc`` was raised (the traceback's last frame whose ``self`` is one), else None."""
    paths = {id(sub): name for name, sub in model.named_modules()}
    found = None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the exception and what caused it
        seen.add(id(exc))
        tb: types.TracebackType | None = exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in paths:
                found = (type(owner).__name__, paths[id(owner)])
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found


def _trace_error(exc: Exception, model: nn.Module) -> TraceError:
    """Return the TraceError for an export failure of the user's ``model``."""
    where = _failing_module(exc, model)
    if where is None:
        block = "the call"
    else:
        block = f"{where[0]} at {where[1]}" if where[1] else f"{where[0]} (its own forward)"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return TraceError(
        f"cannot trace {type(model).__name__}: {block} failed in torch.export "
        f"({type(exc).__name__}: {first}); snapc feeds a UNet sample, timestep and text states "
        "(plus text_embeds and time_ids with addition_embed_type 'text_time'): change that "
        "block's config or replace it")


def _output_scales(module: nn.Module) -> dict[str, float]:
    """Return {block name: output_scale_factor} for ResNet blocks that divide their output."""
    scales: dict[str, float] = {}
    for name, sub in module.named_modules():
        kind = classify_module_type(f"{type(sub).__module__}.{type(sub).__qualname__}")
        factor = getattr(sub, "output_scale_factor", 1.0)
        if kind == RESNET and isinstance(factor, (int, float)) and factor != 1.0:
            scales[name] = float(factor)
    return scales


def trace(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    source: ModelInfo | None = None,
    input_names: Sequence[str] | None = None,
) -> Graph:
    """Export ``module`` on ``example_inputs`` and return a Graph with its block map.

    diffusers ``UNet2DConditionModel`` is called as ``(sample, timestep, encoder_hidden_states)``
    (with ``text_embeds, time_ids`` after them as ``added_cond_kwargs`` when its
    ``addition_embed_type`` is "text_time", SDXL) and its noise prediction is the output; any
    other module is called positionally and its first output is kept. Works on the meta device
    (shapes, params and MACs without weights). Raises TraceError naming the module that
    failed to export.
    """
    module = module.eval()
    inputs = tuple(example_inputs)
    if _is_diffusers_unet(module):
        entry, names = _unet_entry(module, len(inputs))
        names = tuple(input_names or names)
    else:
        entry = _ModuleEntry(module)
        names = tuple(input_names or (f"input_{i}" for i in range(len(inputs))))
    copies: dict[torch.device, nn.Module] = {}

    def export(args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
        """Export the source module for ``args``, on their device (a copy when it differs:
        exported graphs bake devices in, e.g. diffusers' timestep embedding)."""
        device = args[0].device
        first = next(entry.parameters(), None)
        if first is None or device == first.device:
            model = entry
        else:
            if device not in copies:
                copies[device] = copy.deepcopy(entry).to(device)
            model = copies[device]
        try:
            with torch.no_grad():
                return torch.export.export(model, args, strict=False)
        except (SnapcError, MemoryError):
            raise
        except Exception as exc:  # export raises many unrelated types (user code runs in it)
            raise _trace_error(exc, model.net) from exc

    info = source or ModelInfo(name=type(module).__name__, random_weights=False)
    return Graph(program=export(inputs), example_inputs=inputs, input_names=names, source=info,
                 root="net", output_scales=_output_scales(module), retrace=export)
