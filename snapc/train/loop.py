"""The one training loop: steps, precision, EMA, checkpoints, resume, logging and DDP.

Methods (recovery distillation, robust training, step distillation) plug in as small objects
that say what the student is, what a batch is and what the loss is (:class:`Method`); the loop
owns everything else. It never prints: progress goes to a callback on the main process.

Precision: bf16 autocast on CUDA, fp32 on CPU. Optimiser: AdamW with a linear warm-up and
gradient-norm clipping. EMA: diffusers' ``EMAModel`` (decay warm-up ``(1+s)/(10+s)`` up to the
configured decay); the EMA weights are what a run returns. Batches come from generators seeded
by (seed, step), so a resumed run continues exactly where a killed one stopped, and a
data-parallel run of N processes sees the same global batches as one process.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from snapc.errors import SnapcError
from snapc.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from snapc.train.distributed import World
from snapc.train.options import TrainOptions

__all__ = ["Method", "TrainProgress", "TrainResult", "TrainingDivergedError", "train",
           "batch_generator"]

Batch = dict[str, Any]


class TrainingDivergedError(SnapcError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Method(Protocol):
    """What a training method supplies to the loop."""

    name: str
    student: nn.Module  # the module being trained, on the training device
    find_unused_parameters: bool  # DDP: some parameters skip some steps (robust training)

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's slice of global batch ``step`` (deterministic in step)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss of ``model`` (the student, maybe DDP-wrapped) and its
        named parts."""
        ...

    def describe(self) -> dict[str, Any]:
        """Return the method's settings (checked on resume, written in the record)."""
        ...


@dataclass(frozen=True)
class TrainProgress:
    """One step's report to the progress callback."""

    step: int
    total_steps: int | None
    loss: float
    elapsed_s: float
    eta_s: float | None
    parts: dict[str, float]


@dataclass
class TrainResult:
    """A finished run: the EMA weights loaded into the student, and the record."""

    student: nn.Module
    steps: int
    seconds: float
    history: list[dict[str, float]]
    record: dict[str, Any] = field(default_factory=dict)


def batch_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """Return the generator of global batch ``step``: seeded by (seed, step, stream) only."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return gen


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _lr_scale(step: int, seconds: float, options: TrainOptions) -> float:
    """Linear warm-up, then constant or cosine down to 0 at the run's end.

    Progress is the larger of the step and the time fraction, so a minutes-bounded run
    anneals by its training clock (which a resumed run carries on)."""
    warm = min(1.0, (step + 1) / max(options.warmup, 1))
    if options.lr_decay == "constant" or step < options.warmup:
        return warm
    fractions = []
    if options.steps is not None:
        fractions.append((step - options.warmup) / max(options.steps - options.warmup, 1))
    if options.minutes is not None:
        fractions.append(seconds / (60 * options.minutes))
    progress = min(max(fractions), 1.0)
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_resume(state: dict, options: TrainOptions, method: Method, path: Path,
                  world: World) -> None:
    saved = state.get("options", {})
    keys = ("batch", "lr", "warmup", "lr_decay", "weight_decay", "grad_clip", "ema", "seed")
    # Checkpoints written before an option existed hold its default.
    defaults = TrainOptions().to_json()
    diff = [k for k in keys if saved.get(k, defaults[k]) != getattr(options, k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{path} was trained with {k}={saved.get(k)!r}, this run asks "
                              f"{getattr(options, k)!r}; resume with the same options")
    if state.get("method") != method.describe():
        raise CheckpointError(f"{path} is from a different run ({state.get('method', {})}); "
                              "resume with the same model and options or start again")
    if state.get("world_size", 1) != world.size:
        raise CheckpointError(f"{path} was written by {state.get('world_size')} processes; "
                              f"resume with the same number (this run has {world.size})")


def train(
    method: Method,
    options: TrainOptions,
    checkpoints: Path,
    *,
    world: World,
    resume: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train ``method.student`` with ``options``; checkpoints go to the folder ``checkpoints``.

    ``resume`` continues from the newest checkpoint there (CheckpointError when there is none
    or it is from another run). Raises TrainingDivergedError on a NaN/inf loss, before the
    optimiser applies it. Returns the student holding the EMA weights.
    """
    from diffusers.training_utils import EMAModel

    student = method.student
    params = [p for p in student.parameters() if p.requires_grad]
    cuda = world.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay,
                            fused=cuda)
    ema = EMAModel(params, decay=options.ema, foreach=True)
    step, seconds, history, runs = 0, 0.0, [], []
    if resume:
        path = latest_checkpoint(checkpoints)
        if path is None:
            raise CheckpointError(f"no checkpoint in {checkpoints} to resume from; "
                                  "start without --resume")
        state = load_checkpoint(path)
        _check_resume(state, options, method, path, world)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        ema.to(world.device)  # the checkpoint was read onto the CPU; the shadow follows the params
        step, seconds = int(state["step"]), float(state["seconds"])
        history, runs = list(state["history"]), list(state.get("runs", []))
    elif latest_checkpoint(checkpoints) is not None:
        raise CheckpointError(f"{checkpoints} holds checkpoints of an earlier run; pass "
                              "--resume to continue it, or delete the folder to start again")
    runs.append({"start_step": step, "device": _device_name(world.device),
                 "world_size": world.size, "torch": torch.__version__})
    model: nn.Module = student
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[world.device.index] if cuda else None,
            find_unused_parameters=method.find_unused_parameters)
    student.train()
    window: list[float] = []
    window_parts: dict[str, list[float]] = {}

    def checkpoint_state() -> dict[str, Any]:
        return {"step": step, "seconds": seconds, "student": student.state_dict(),
                "optimizer": opt.state_dict(), "ema": ema.state_dict(),
                "history": history, "runs": runs, "options": options.to_json(),
                "method": method.describe(), "world_size": world.size}

    started = time.perf_counter() - seconds
    last_good = latest_checkpoint(checkpoints)
    while True:
        seconds = time.perf_counter() - started
        done = (options.steps is not None and step >= options.steps) or (
            options.minutes is not None and seconds >= 60 * options.minutes)
        if world.agree(done):
            break
        batch = method.batch(step, world)
        for group in opt.param_groups:
            group["lr"] = options.lr * _lr_scale(step, seconds, options)
        autocast = (torch.autocast("cuda", torch.bfloat16) if cuda
                    else contextlib.nullcontext())
        with autocast:
            loss, parts = method.loss(model, batch)
        mean = world.all_mean(loss.detach().float()).item()
        if not math.isfinite(mean):
            where = f"; the last good checkpoint is {last_good}" if last_good else ""
            raise TrainingDivergedError(
                f"loss became {mean} at step {step + 1}{where}; lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
        opt.step()
        ema.step(params)
        step += 1
        window.append(mean)
        for k, v in parts.items():
            window_parts.setdefault(k, []).append(v)
        seconds = time.perf_counter() - started
        if step % options.log_every == 0 or step == options.steps:
            history.append({"step": step, "loss": sum(window) / len(window),
                            "seconds": round(seconds, 2),
                            **{k: sum(v) / len(v) for k, v in window_parts.items()}})
            window, window_parts = [], {}
        if progress is not None and world.main:
            progress(TrainProgress(step, options.steps, mean, seconds,
                                   _eta(step, seconds, options), dict(parts)))
        if step % options.checkpoint_every == 0:
            if world.main:
                last_good = save_checkpoint(checkpoints, step, checkpoint_state(),
                                            options.keep_checkpoints)
            world.barrier()
    if world.main and step > 0:
        save_checkpoint(checkpoints, step, checkpoint_state(), options.keep_checkpoints)
    world.barrier()
    ema.copy_to(params)
    student.eval()
    record = {"method": method.describe(), "options": options.to_json(), "steps": step,
              "train_seconds": round(seconds, 1), "runs": runs, "loss_curve": history,
              "final_loss": history[-1]["loss"] if history else None,
              "world_size": world.size}
    return TrainResult(student, step, seconds, history, record)


def _eta(step: int, seconds: float, options: TrainOptions) -> float | None:
    etas = []
    if options.steps is not None and step > 0:
        etas.append((options.steps - step) * seconds / step)
    if options.minutes is not None:
        etas.append(max(60 * options.minutes - seconds, 0.0))
    return min(etas) if etas else None
