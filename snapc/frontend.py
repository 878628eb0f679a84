"""Trace a module to a Graph with torch.export (fx.symbolic_trace fails on diffusers UNets)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from snapc.blocks import RESNET, classify_module_type
from snapc.graph import Graph, ModelInfo

__all__ = ["trace", "UNET_INPUTS"]

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class _UNetEntry(nn.Module):
    """Calls a diffusers UNet with positional inputs and returns the noise prediction tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.net(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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
    and its noise prediction is the output; any other module is called positionally and its
    first output is kept. Works on the meta device (shapes, params and MACs without weights).
    """
    module = module.eval()
    inputs = tuple(example_inputs)
    if _is_diffusers_unet(module):
        entry: nn.Module = _UNetEntry(module)
        names = tuple(input_names or UNET_INPUTS)
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
        with torch.no_grad():
            return torch.export.export(model, args, strict=False)

    info = source or ModelInfo(name=type(module).__name__, random_weights=False)
    return Graph(program=export(inputs), example_inputs=inputs, input_names=names, source=info,
                 root="net", output_scales=_output_scales(module), retrace=export)
