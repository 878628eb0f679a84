"""Structured channel pruning of a diffusers ``AutoencoderKL`` decoder, per ResNet block.

What is pruned: the inner channels of every ``ResnetBlock2D`` of the decoder (mid block and
up blocks), i.e. the output channels of ``conv1``, the channels of ``norm2`` and the input
channels of ``conv2``. Every block's input and output width stays as it was, so residual
additions, the mid-block attention, the upsamplers, ``conv_out`` and the feature maps each
block hands on are unchanged (which is also what lets the feature loss compare student and
teacher block outputs directly). The up-block widths themselves are not pruned.

Importance criterion: the L1 norm of each ``conv1`` output filter (Li et al., 2017, "Pruning
Filters for Efficient ConvNets"), ``sum |conv1.weight[c]|``. Channels are chosen inside each
GroupNorm group of ``norm2`` so the pruned block keeps ``norm2``'s groups aligned with the
original ones: ``round(keep x channels per group)`` channels per group (at least one); when
that would be under one channel per group, whole groups (ranked by their summed importance)
are removed instead and one channel kept in each remaining group.

Why not ``torch.nn.utils.prune``: it masks weights in place (the zeros stay in the tensor and
cost the same MACs) and ranks a whole dimension at once, without the GroupNorm constraint;
here the convolutions must become physically smaller.

Both entry points are functional: the input model is never changed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from snapc.errors import SnapcError

__all__ = ["CRITERION", "ResnetPlan", "PruneRecord", "decoder_resnets", "planned_width",
           "channel_importance", "plan_pruning", "prune_decoder", "apply_layout"]

CRITERION = "l1-conv1-filter"


@dataclass(frozen=True)
class ResnetPlan:
    """One ResNet block's inner width before and after pruning, and the channels kept."""

    name: str
    groups_before: int
    width_before: int
    groups: int
    width: int
    kept: tuple[int, ...]


@dataclass(frozen=True)
class PruneRecord:
    """What :func:`prune_decoder` did: the keep ratio, criterion and each block's plan."""

    keep: float
    criterion: str
    plans: tuple[ResnetPlan, ...]

    def layout(self) -> dict[str, list[int]]:
        """Return {resnet name: [groups, width]}: what a loader needs to rebuild the decoder."""
        return {p.name: [p.groups, p.width] for p in self.plans}

    def channels_removed(self) -> float:
        """Return the fraction of inner ResNet channels removed, over the whole decoder."""
        before = sum(p.width_before for p in self.plans)
        return 1.0 - sum(p.width for p in self.plans) / before

    def to_json(self) -> dict:
        """Return the record as a JSON-ready dict (kept indices included)."""
        return {"keep": self.keep, "criterion": self.criterion,
                "channels_removed": round(self.channels_removed(), 4),
                "plans": [asdict(p) | {"kept": list(p.kept)} for p in self.plans]}


def decoder_resnets(vae: nn.Module) -> dict[str, nn.Module]:
    """Return {name under the AutoencoderKL: ResnetBlock2D} of the decoder, in order."""
    from diffusers.models.resnet import ResnetBlock2D

    return {f"decoder.{name}": m for name, m in vae.decoder.named_modules()
            if isinstance(m, ResnetBlock2D)}


def planned_width(groups: int, width: int, keep: float) -> tuple[int, int]:
    """Return (groups, width) of a GroupNorm'd inner width ``width`` kept at ``keep``."""
    per_group = width // groups
    kept_per_group = per_group * keep
    if kept_per_group >= 1:
        return groups, groups * max(1, round(kept_per_group))
    new_groups = max(1, round(groups * kept_per_group))
    return new_groups, new_groups


def channel_importance(resnet: nn.Module) -> torch.Tensor:
    """Return the importance of each inner channel: the L1 norm of its conv1 filter."""
    return resnet.conv1.weight.detach().float().abs().flatten(1).sum(1)


def _select(importance: torch.Tensor, groups: int, new_groups: int,
            per_group: int) -> tuple[int, ...]:
    by_group = importance.view(groups, -1)
    top_groups = by_group.sum(1).topk(new_groups).indices.sort().values
    size = by_group.shape[1]
    kept = []
    for g in top_groups.tolist():
        inside = by_group[g].topk(per_group).indices.sort().values
        kept.extend((g * size + inside).tolist())
    return tuple(kept)


def _check_keep(keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise SnapcError(f"--keep must be in (0, 1] (the fraction of ResNet channels kept), "
                         f"not {keep}")


def plan_pruning(vae: nn.Module, keep: float) -> PruneRecord:
    """Return the plan of pruning ``vae``'s decoder to ``keep`` of its ResNet inner channels.

    Raises SnapcError for a ratio outside (0, 1]. Reads the weights, changes nothing.
    """
    _check_keep(keep)
    plans = []
    for name, resnet in decoder_resnets(vae).items():
        groups, width = resnet.norm2.num_groups, resnet.conv1.out_channels
        new_groups, new_width = planned_width(groups, width, keep)
        kept = _select(channel_importance(resnet), groups, new_groups, new_width // new_groups)
        plans.append(ResnetPlan(name, groups, width, new_groups, new_width, kept))
    return PruneRecord(keep, CRITERION, tuple(plans))


def _resize(resnet: nn.Module, groups: int, width: int,
            kept: tuple[int, ...] | None) -> None:
    """Give ``resnet`` an inner width of ``width`` in ``groups`` groups (in place), copying the
    kept channels' weights when ``kept`` is given (else fresh modules, weights to be loaded)."""
    conv1, norm2, conv2 = resnet.conv1, resnet.norm2, resnet.conv2
    new1 = nn.Conv2d(conv1.in_channels, width, conv1.kernel_size, conv1.stride, conv1.padding)
    new_norm = nn.GroupNorm(groups, width, eps=norm2.eps, affine=norm2.affine)
    new2 = nn.Conv2d(width, conv2.out_channels, conv2.kernel_size, conv2.stride, conv2.padding)
    if kept is not None:
        idx = torch.tensor(kept, dtype=torch.long)
        with torch.no_grad():
            new1.weight.copy_(conv1.weight[idx])
            new1.bias.copy_(conv1.bias[idx])
            new_norm.weight.copy_(norm2.weight[idx])
            new_norm.bias.copy_(norm2.bias[idx])
            new2.weight.copy_(conv2.weight[:, idx])
            new2.bias.copy_(conv2.bias)
    ref = conv1.weight
    resnet.conv1 = new1.to(ref.device, ref.dtype)
    resnet.norm2 = new_norm.to(ref.device, ref.dtype)
    resnet.conv2 = new2.to(ref.device, ref.dtype)


def prune_decoder(vae: nn.Module, keep: float) -> tuple[nn.Module, PruneRecord]:
    """Return a copy of ``vae`` whose decoder keeps ``keep`` of its ResNet inner channels (by
    the L1 criterion), and the record; ``vae`` itself is not changed.

    The encoder, ``quant_conv`` and ``post_quant_conv`` are copied unchanged.
    """
    record = plan_pruning(vae, keep)
    pruned = copy.deepcopy(vae)
    resnets = decoder_resnets(pruned)
    for plan in record.plans:
        _resize(resnets[plan.name], plan.groups, plan.width, plan.kept)
    return pruned, record


def apply_layout(vae: nn.Module, layout: dict[str, list[int]]) -> nn.Module:
    """Resize ``vae``'s decoder ResNets (in place) to a saved layout {name: [groups, width]},
    ready for ``load_state_dict`` of a compressed decoder's weights; returns ``vae``.

    Raises SnapcError when the layout names a block the decoder does not have.
    """
    resnets = decoder_resnets(vae)
    unknown = sorted(set(layout) - set(resnets))
    if unknown:
        raise SnapcError(f"decoder layout names blocks this autoencoder lacks ({unknown[0]}, "
                         f"...); load it with the base config it was pruned from")
    for name, (groups, width) in layout.items():
        _resize(resnets[name], int(groups), int(width), None)
    return vae
