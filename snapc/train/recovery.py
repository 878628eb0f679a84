"""Recovery distillation and robust training: two methods for the training loop.

Recovery (BK-SDM): the student is the pruned UNet holding the original weights, the teacher the
original; loss = task * MSE(student eps, noise) + output_kd * MSE(student eps, teacher eps)
+ feature_kd * mean over stages of MSE(student stage output, teacher stage output).

Robust training (SnapFusion's architecture-evolution prerequisite): the full UNet learns to work
with removable blocks skipped at random, distilled from the frozen original, so that a
sub-network's quality as removed says more about what it can become. Steps alternate between
the full network (so it stays as good as the teacher) and a random sub-network whose blocks
are each skipped with a probability drawn per step (the "sandwich" of slimmable networks
rather than always-random depth, which left the full model far below the teacher).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snapc.pruned import removable_blocks, skip_blocks, skip_path
from snapc.train.data import NoisedBatches
from snapc.train.distributed import World
from snapc.train.features import capture_stages, feature_loss
from snapc.train.loop import Batch, batch_generator
from snapc.train.options import RecoveryLoss

__all__ = ["RecoveryDistillation", "RobustTraining", "MaybeSkip", "unwrap_skippable"]


def _eps(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["x_t"], batch["t"], batch["context"], return_dict=False)[0]


def _distill_loss(model: nn.Module, student: nn.Module, teacher: nn.Module, batch: Batch,
                  weights: RecoveryLoss) -> tuple[torch.Tensor, dict[str, float]]:
    use_features = weights.feature_kd > 0
    with torch.no_grad():
        if use_features:
            with capture_stages(teacher) as teacher_stages:
                teacher_eps = _eps(teacher, batch)
        else:
            teacher_eps, teacher_stages = _eps(teacher, batch), {}
    if use_features:
        with capture_stages(student) as student_stages:
            eps = _eps(model, batch).float()
    else:
        eps, student_stages = _eps(model, batch).float(), {}
    task = F.mse_loss(eps, batch["noise"])
    out_kd = F.mse_loss(eps, teacher_eps.float())
    feat = feature_loss(student_stages, teacher_stages) if use_features else task.new_zeros(())
    loss = weights.task * task + weights.output_kd * out_kd + weights.feature_kd * feat
    return loss, {"task": task.item(), "output_kd": out_kd.item(), "feature_kd": feat.item()}


class RecoveryDistillation:
    """Train a pruned student to match the original teacher (task + output + feature KD)."""

    name = "recovery"
    find_unused_parameters = False

    def __init__(self, teacher: nn.Module, removed: Sequence[str], data: NoisedBatches,
                 weights: RecoveryLoss, *, start: nn.Module | None = None) -> None:
        """``start`` is the module whose weights the student starts from (the teacher by
        default; a robust-trained model for SnapFusion's flow)."""
        device = data.device
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        base = copy.deepcopy(start if start is not None else teacher)
        self.removed = tuple(removed)
        self.student = skip_blocks(base, self.removed, in_place=True).to(device)
        self.student.requires_grad_(True).train()
        self.data, self.weights = data, weights

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's slice of global batch ``step``."""
        return self.data.batch(step, world)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted recovery loss of the student and its parts."""
        return _distill_loss(model, self.student, self.teacher, batch, self.weights)

    def describe(self) -> dict[str, Any]:
        """Return the removed blocks, loss weights and data source."""
        return {"method": self.name, "removed": list(self.removed),
                "loss": self.weights.to_json(), "data": self.data.describe()}


class MaybeSkip(nn.Module):
    """A block that runs, or takes its skip path, as ``skipped`` says (robust training)."""

    def __init__(self, name: str, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.skip = skip_path(name, block)
        self.skipped = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the skip path when skipped, else the block."""
        return (self.skip if self.skipped else self.block)(*args, **kwargs)


def _wrap_skippable(unet: nn.Module, names: Sequence[str]) -> dict[str, MaybeSkip]:
    wrapped = {}
    for name in names:
        parent_name, _, index = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        wrapped[name] = parent[int(index)] = MaybeSkip(name, parent[int(index)])
    return wrapped


def unwrap_skippable(unet: nn.Module) -> nn.Module:
    """Return ``unet`` (edited in place) with every MaybeSkip replaced by its block."""
    for name in removable_blocks(unet):
        parent_name, _, index = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        if isinstance(parent[int(index)], MaybeSkip):
            parent[int(index)] = parent[int(index)].block
    return unet


class RobustTraining:
    """Fine-tune the full UNet so random sub-networks work, distilled from the original.

    Even steps train the full network, odd steps a sub-network in which each candidate block
    is skipped with a probability drawn from ``drop_rates`` for that step. ``keep`` blocks are
    never skipped.
    """

    name = "robust"
    find_unused_parameters = True

    def __init__(self, teacher: nn.Module, data: NoisedBatches, weights: RecoveryLoss, *,
                 keep: Sequence[str] = (), drop_rates: Sequence[float] = (0.25, 0.5, 0.75),
                 seed: int = 0) -> None:
        device = data.device
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        student = copy.deepcopy(teacher).to(device).requires_grad_(True).train()
        self.candidates = [n for n in removable_blocks(student) if n not in set(keep)]
        self.switches = _wrap_skippable(student, self.candidates)
        self.student, self.data, self.weights = student, data, weights
        self.drop_rates, self.seed = tuple(drop_rates), seed

    def skipped_at(self, step: int) -> list[str]:
        """Return the blocks skipped at ``step`` (none on even steps)."""
        if step % 2 == 0:
            return []
        gen = batch_generator(self.seed, step, torch.device("cpu"), stream=2)
        rate = self.drop_rates[int(torch.randint(len(self.drop_rates), (1,), generator=gen))]
        draws = torch.rand(len(self.candidates), generator=gen)
        return [n for n, d in zip(self.candidates, draws.tolist(), strict=True) if d < rate]

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's slice of global batch ``step``, with that step's skip set."""
        return {**self.data.batch(step, world), "skip": self.skipped_at(step)}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the KD loss of the sub-network this batch names."""
        skip = set(batch["skip"])
        for name, switch in self.switches.items():
            switch.skipped = name in skip
        loss, parts = _distill_loss(model, self.student, self.teacher, batch, self.weights)
        return loss, {**parts, "skipped": float(len(skip))}

    def describe(self) -> dict[str, Any]:
        """Return the candidates, drop rates, loss weights and data source."""
        return {"method": self.name, "candidates": self.candidates,
                "drop_rates": list(self.drop_rates), "loss": self.weights.to_json(),
                "data": self.data.describe()}

    def trained_unet(self) -> nn.Module:
        """Return the trained full UNet without the skip switches (a plain diffusers UNet)."""
        for switch in self.switches.values():
            switch.skipped = False
        return unwrap_skippable(self.student)
