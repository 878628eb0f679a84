"""Structured channel pruning of a diffusers ``AutoencoderKL`` decoder, per block.

Two kinds of channels, each with its own keep ratio:

- **ResNet inner channels** (``keep``): the output channels of every decoder
  ``ResnetBlock2D``'s ``conv1``, the channels of its ``norm2`` and the input channels of its
  ``conv2``. Block inputs and outputs keep their width.
- **Block widths** (``width_keep``): the channels of each residual stream the decoder carries:
  the mid block's (``conv_in`` through the mid block), then each up block's output. A stream
  that an up block hands on through an identity shortcut (its first ResNet has no
  ``conv_shortcut``) stays one stream. Every module reading a stream (GroupNorms, ``conv1``
  and ``conv_shortcut`` inputs, the attention's q/k/v, the upsampler, ``conv_norm_out``,
  ``conv_out``) and writing it (``conv_in``, ``conv2``, ``conv_shortcut``, the attention's
  output projection, the upsampler) is cut to the kept channels; the attention's inner width
  is kept. The feature maps each stage hands on are then narrower than the teacher's; the
  feature loss compares them on the kept channels (:func:`PruneRecord.stage_channels`).

Importance criterion (both kinds): the L1 norm of the convolution filters that write a
channel (Li et al., 2017, "Pruning Filters for Efficient ConvNets"): for an inner channel,
its ``conv1`` filter; for a stream channel, the sum over every writer of that stream of its
filter's L1 norm divided by the writer's mean filter norm (so writers of different scale
count alike). Channels are chosen inside each GroupNorm group so the pruned groups stay
aligned with the original ones: ``round(keep x channels per group)`` per group (at least one);
below one channel per group, whole groups (ranked by summed importance) go instead.

Why not ``torch.nn.utils.prune``: it masks weights in place (the zeros stay in the tensor and
cost the same MACs) and ranks a whole dimension at once, without the GroupNorm constraint;
here the convolutions must become physically smaller.

The layout of a pruned decoder (:func:`module_layout`) is the shape of every Conv2d, Linear
and GroupNorm under ``decoder``; :func:`apply_layout` rebuilds a decoder to it for loading.
Both pruning entry points are functional: the input model is never changed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from snapc.errors import SnapcError

__all__ = ["CRITERION", "ChannelPlan", "PruneRecord", "decoder_resnets", "planned_width",
           "channel_importance", "plan_pruning", "prune_decoder", "module_layout",
           "apply_layout"]

CRITERION = "l1-filter-norm"


@dataclass(frozen=True)
class ChannelPlan:
    """One channel set's width before and after pruning (a ResNet's inner channels, kind
    ``inner``, or a residual stream, kind ``stream``) and the channels kept."""

    name: str
    kind: str
    groups_before: int
    width_before: int
    groups: int
    width: int
    kept: tuple[int, ...]


@dataclass(frozen=True)
class PruneRecord:
    """What :func:`prune_decoder` did: the keep ratios, criterion and each channel set's plan;
    ``stages`` maps each decoder stage (mid block, up blocks) to its output stream."""

    keep: float
    width_keep: float
    criterion: str
    plans: tuple[ChannelPlan, ...]
    stages: tuple[tuple[str, str], ...] = ()

    def of_kind(self, kind: str) -> list[ChannelPlan]:
        """Return the plans of one kind (``inner`` or ``stream``)."""
        return [p for p in self.plans if p.kind == kind]

    def channels_removed(self, kind: str = "inner") -> float:
        """Return the fraction of ``kind`` channels removed, over the whole decoder."""
        plans = self.of_kind(kind)
        if not plans:
            return 0.0
        return 1.0 - sum(p.width for p in plans) / sum(p.width_before for p in plans)

    def stage_channels(self) -> dict[str, list[int]]:
        """Return {stage: the teacher's channels its pruned output keeps} (streams pruned)."""
        streams = {p.name: list(p.kept) for p in self.of_kind("stream")}
        return {stage: streams[stream] for stage, stream in self.stages if stream in streams}

    def to_json(self) -> dict:
        """Return the record as a JSON-ready dict (kept indices included)."""
        return {"keep": self.keep, "width_keep": self.width_keep, "criterion": self.criterion,
                "inner_channels_removed": round(self.channels_removed("inner"), 4),
                "stream_channels_removed": round(self.channels_removed("stream"), 4),
                "plans": [asdict(p) | {"kept": list(p.kept)} for p in self.plans],
                "stages": [list(s) for s in self.stages]}


def decoder_resnets(vae: nn.Module) -> dict[str, nn.Module]:
    """Return {name under the AutoencoderKL: ResnetBlock2D} of the decoder, in order."""
    from diffusers.models.resnet import ResnetBlock2D

    return {f"decoder.{name}": m for name, m in vae.decoder.named_modules()
            if isinstance(m, ResnetBlock2D)}


def planned_width(groups: int, width: int, keep: float) -> tuple[int, int]:
    """Return (groups, width) of a GroupNorm'd width ``width`` kept at ``keep``."""
    per_group = width // groups
    kept_per_group = per_group * keep
    if kept_per_group >= 1:
        return groups, groups * max(1, round(kept_per_group))
    new_groups = max(1, round(groups * kept_per_group))
    return new_groups, new_groups


def _filter_l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().flatten(1).sum(1)


def channel_importance(resnet: nn.Module) -> torch.Tensor:
    """Return the importance of each inner channel: the L1 norm of its conv1 filter."""
    return _filter_l1(resnet.conv1.weight)


def _select(importance: torch.Tensor, groups: int, keep: float) -> tuple[int, int,
                                                                        tuple[int, ...]]:
    width = importance.numel()
    new_groups, new_width = planned_width(groups, width, keep)
    by_group = importance.view(groups, -1)
    top_groups = by_group.sum(1).topk(new_groups).indices.sort().values
    size, per_group = by_group.shape[1], new_width // new_groups
    kept: list[int] = []
    for g in top_groups.tolist():
        inside = by_group[g].topk(per_group).indices.sort().values
        kept.extend((g * size + inside).tolist())
    return new_groups, new_width, tuple(kept)


def _check_ratio(value: float, flag: str, what: str) -> None:
    if not 0.0 < value <= 1.0:
        raise SnapcError(f"{flag} must be in (0, 1] (the fraction of {what} kept), not {value}")


def _check_keep(keep: float, width_keep: float = 1.0) -> None:
    _check_ratio(keep, "--keep", "ResNet channels")
    _check_ratio(width_keep, "--width-keep", "block-width channels")


# ---- residual streams of the decoder --------------------------------------------------------

@dataclass
class _Streams:
    """Which stream each block reads and writes, and every reader / writer of each stream."""

    names: list[str]
    writers: dict[str, list[tuple[str, str]]]  # stream -> [(module name, role)]
    readers: dict[str, list[tuple[str, str]]]
    stages: list[tuple[str, str]]


def _streams(vae: nn.Module) -> _Streams:
    dec = vae.decoder
    names = ["mid"]
    writers: dict[str, list[tuple[str, str]]] = {"mid": [("decoder.conv_in", "conv")]}
    readers: dict[str, list[tuple[str, str]]] = {"mid": []}

    def resnet(prefix: str, block: nn.Module, src: str, dst: str) -> None:
        readers[src] += [(f"{prefix}.norm1", "norm"), (f"{prefix}.conv1", "conv")]
        writers[dst].append((f"{prefix}.conv2", "conv"))
        if block.conv_shortcut is not None:
            readers[src].append((f"{prefix}.conv_shortcut", "conv"))
            writers[dst].append((f"{prefix}.conv_shortcut", "conv"))

    for j, r in enumerate(dec.mid_block.resnets):
        resnet(f"decoder.mid_block.resnets.{j}", r, "mid", "mid")
    for k, _ in enumerate(dec.mid_block.attentions):
        a = f"decoder.mid_block.attentions.{k}"
        readers["mid"] += [(f"{a}.group_norm", "norm"), (f"{a}.to_q", "linear"),
                           (f"{a}.to_k", "linear"), (f"{a}.to_v", "linear")]
        writers["mid"].append((f"{a}.to_out.0", "linear"))
    stages = [("mid_block", "mid")]
    current = "mid"
    for i, block in enumerate(dec.up_blocks):
        if block.resnets[0].conv_shortcut is not None:
            names.append(f"up_blocks.{i}")
            writers[names[-1]], readers[names[-1]] = [], []
        src, dst = current, names[-1]
        for j, r in enumerate(block.resnets):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", r, src if j == 0 else dst, dst)
        for u, _ in enumerate(block.upsamplers or ()):
            up = f"decoder.up_blocks.{i}.upsamplers.{u}.conv"
            readers[dst].append((up, "conv"))
            writers[dst].append((up, "conv"))
        stages.append((f"up_blocks.{i}", dst))
        current = dst
    readers[current] += [("decoder.conv_norm_out", "norm"), ("decoder.conv_out", "conv")]
    return _Streams(names, writers, readers, stages)


def _stream_importance(vae: nn.Module, writers: list[tuple[str, str]]) -> torch.Tensor:
    total = None
    for name, _ in writers:
        norms = _filter_l1(vae.get_submodule(name).weight)
        norms = norms / norms.mean().clamp(min=1e-12)
        total = norms if total is None else total + norms
    return total


def _stream_groups(vae: nn.Module, readers: list[tuple[str, str]]) -> int:
    return next(vae.get_submodule(n).num_groups for n, role in readers if role == "norm")


def plan_pruning(vae: nn.Module, keep: float, width_keep: float = 1.0) -> PruneRecord:
    """Return the plan of pruning ``vae``'s decoder: ``keep`` of each ResNet's inner channels
    and ``width_keep`` of each block-width stream. Reads the weights, changes nothing.

    Raises SnapcError for a ratio outside (0, 1].
    """
    _check_keep(keep, width_keep)
    streams = _streams(vae)
    plans = []
    if width_keep < 1.0:
        for name in streams.names:
            importance = _stream_importance(vae, streams.writers[name])
            groups = _stream_groups(vae, streams.readers[name])
            g, w, kept = _select(importance, groups, width_keep)
            plans.append(ChannelPlan(name, "stream", groups, importance.numel(), g, w, kept))
    for name, resnet in decoder_resnets(vae).items():
        groups, width = resnet.norm2.num_groups, resnet.conv1.out_channels
        g, w, kept = _select(channel_importance(resnet), groups, keep)
        plans.append(ChannelPlan(name, "inner", groups, width, g, w, kept))
    return PruneRecord(keep, width_keep, CRITERION, tuple(plans), tuple(streams.stages))


# ---- module surgery ------------------------------------------------------------------------

def _idx(kept: tuple[int, ...] | None) -> torch.Tensor | slice:
    return slice(None) if kept is None else torch.tensor(kept, dtype=torch.long)


def _cut(module: nn.Module, in_kept: tuple[int, ...] | None, out_kept: tuple[int, ...] | None,
         groups: int | None = None) -> nn.Module:
    """Return a copy of a Conv2d / Linear / GroupNorm keeping the given input / output
    channels (None: all); a GroupNorm's channels are ``out_kept``, in ``groups`` groups."""
    w = module.weight.detach()
    o, i = _idx(out_kept), _idx(in_kept)
    if isinstance(module, nn.GroupNorm):
        new = nn.GroupNorm(groups or module.num_groups, len(out_kept) if out_kept else
                           module.num_channels, eps=module.eps, affine=module.affine)
        weight, bias = w[o], module.bias.detach()[o]
    else:
        weight = w[o][:, i]
        bias = None if module.bias is None else module.bias.detach()[o]
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(weight.shape[1], weight.shape[0], module.kernel_size, module.stride,
                            module.padding, bias=bias is not None)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(w.device, w.dtype)


def _set(vae: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = vae.get_submodule(parent_name)
    if child.isdigit():  # an entry of a ModuleList (attention's to_out.0)
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def _sync_upsamplers(vae: nn.Module) -> None:
    """Keep Upsample2D's recorded channel counts (it asserts them) equal to its conv's."""
    from diffusers.models.upsampling import Upsample2D

    for m in vae.decoder.modules():
        if isinstance(m, Upsample2D) and m.conv is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels


def _apply(vae: nn.Module, record: PruneRecord) -> None:
    streams = _streams(vae)
    cuts: dict[str, dict] = {}  # module -> {"in": kept, "out": kept, "groups": g}
    for plan in record.of_kind("stream"):
        for name, role in streams.readers[plan.name]:
            entry = cuts.setdefault(name, {})
            if role == "norm":
                entry |= {"out": plan.kept, "groups": plan.groups}
            else:
                entry["in"] = plan.kept
        for name, _ in streams.writers[plan.name]:
            cuts.setdefault(name, {})["out"] = plan.kept
    for plan in record.of_kind("inner"):
        cuts.setdefault(f"{plan.name}.conv1", {})["out"] = plan.kept
        cuts.setdefault(f"{plan.name}.norm2", {}).update(out=plan.kept, groups=plan.groups)
        cuts.setdefault(f"{plan.name}.conv2", {})["in"] = plan.kept
    for name, c in cuts.items():
        _set(vae, name, _cut(vae.get_submodule(name), c.get("in"), c.get("out"),
                             c.get("groups")))
    _sync_upsamplers(vae)


def prune_decoder(vae: nn.Module, keep: float,
                  width_keep: float = 1.0) -> tuple[nn.Module, PruneRecord]:
    """Return a copy of ``vae`` whose decoder keeps ``keep`` of its ResNet inner channels and
    ``width_keep`` of its block widths (by the L1 criterion), and the record; ``vae`` itself
    is not changed. The encoder, ``quant_conv`` and ``post_quant_conv`` are copied as they are.
    """
    record = plan_pruning(vae, keep, width_keep)
    pruned = copy.deepcopy(vae)
    _apply(pruned, record)
    return pruned, record


def module_layout(vae: nn.Module) -> dict[str, list[int]]:
    """Return {module: shape} of every Conv2d / Linear ([in, out]) and GroupNorm ([groups,
    channels]) under the decoder: what a loader needs to rebuild a pruned decoder."""
    layout = {}
    for name, m in vae.decoder.named_modules():
        if isinstance(m, nn.Conv2d):
            layout[f"decoder.{name}"] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            layout[f"decoder.{name}"] = [m.in_features, m.out_features]
        elif isinstance(m, nn.GroupNorm):
            layout[f"decoder.{name}"] = [m.num_groups, m.num_channels]
    return layout


def _fresh(module: nn.Module, shape: list[int]) -> nn.Module:
    a, b = (int(v) for v in shape)
    if isinstance(module, nn.GroupNorm):
        return nn.GroupNorm(a, b, eps=module.eps, affine=module.affine)
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(a, b, module.kernel_size, module.stride, module.padding, bias=bias)
    return nn.Linear(a, b, bias=bias)


def apply_layout(vae: nn.Module, layout: dict[str, list[int]]) -> nn.Module:
    """Resize ``vae``'s decoder modules (in place) to a saved :func:`module_layout`, ready for
    ``load_state_dict`` of a compressed decoder's weights; returns ``vae``.

    Raises SnapcError when the layout names a module the decoder does not have.
    """
    current = module_layout(vae)
    unknown = sorted(set(layout) - set(current))
    if unknown:
        raise SnapcError(f"decoder layout names modules this autoencoder lacks ({unknown[0]}, "
                         f"...); load it with the base config it was pruned from")
    for name, shape in layout.items():
        if list(shape) != current[name]:
            _set(vae, name, _fresh(vae.get_submodule(name), shape))
    _sync_upsamplers(vae)
    return vae
