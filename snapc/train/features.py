"""Stage outputs of a diffusers UNet, for feature-level distillation (BK-SDM's feature KD).

A stage is each down block, the mid block and each up block; its output is the hidden state
it hands on (a down block's first return value). Forward hooks record them on every call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

__all__ = ["stage_modules", "capture_outputs", "capture_stages", "feature_loss"]


def stage_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Return {stage name: module} of a diffusers UNet (down, mid, up), in order."""
    stages = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if getattr(unet, "mid_block", None) is not None:
        stages["mid_block"] = unet.mid_block
    stages |= {f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)}
    return stages


@contextmanager
def capture_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict filled with each named module's output (the first element of a tuple
    output) during forwards inside the block; the hooks are removed on exit."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_mod: nn.Module, _inp: object, out: object, name: str = name) -> None:
            found[name] = out[0] if isinstance(out, (tuple, list)) else out

        handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def capture_stages(unet: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]:
    """Capture each UNet stage's output during forwards inside the block (capture_outputs)."""
    return capture_outputs(stage_modules(unet))


def feature_loss(student: dict[str, torch.Tensor],
                 teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the mean over stages of MSE(student stage output, teacher stage output)."""
    losses = [torch.nn.functional.mse_loss(student[k].float(), teacher[k].float())
              for k in teacher]
    return torch.stack(losses).mean()
