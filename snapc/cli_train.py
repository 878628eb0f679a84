"""`snapc distill`: recovery distillation (and robust training) from the command line.

Parses arguments, builds the options dataclasses and calls snapc.train; shows a progress bar
with the loss and the time left. Runs data-parallel under ``torchrun`` unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from snapc.cli_common import (
    CheckpointEveryOpt,
    EmaOpt,
    ForceOpt,
    LrOpt,
    ModelArg,
    ResumeOpt,
    TrainBatchOpt,
    TrainDeviceOpt,
    WarmupOpt,
    fail,
    out,
)
from snapc.cli_training import run_training
from snapc.errors import SnapcError

__all__ = ["distill_command"]


def distill_command(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the recovered "
                                         "model (diffusers weights + snapc_pruned.json)")],
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", help="block to remove (repeatable); see `snapc inspect`")] = None,
    device: Annotated[str | None, typer.Option(
        help="device whose latency the block search cuts (with --budget)")] = None,
    budget: Annotated[float | None, typer.Option(
        help="target latency as a fraction of today's on --device")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="block the search must not remove (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(help="recovery training steps")] = None,
    minutes: Annotated[float | None, typer.Option(
        help="recovery training minutes (with --steps: whichever ends first)")] = None,
    robust_steps: Annotated[int | None, typer.Option(
        help="robust-training steps before the search")] = None,
    robust_minutes: Annotated[float | None, typer.Option(
        help="robust-training minutes before the search (SnapFusion's architecture evolution)")]
    = None,
    screen: Annotated[int, typer.Option(
        help="also screen N random sets meeting the budget: each candidate (the search's pick "
             "and these) is recovered briefly and the best one recovered in full")] = 0,
    screen_steps: Annotated[int | None, typer.Option(help="steps of each screening run")]
    = None,
    screen_minutes: Annotated[float | None, typer.Option(
        help="minutes of each screening run")] = None,
    train_device: TrainDeviceOpt = "auto",
    batch: TrainBatchOpt = 64,
    lr: LrOpt = 1e-4,
    warmup: WarmupOpt = 100,
    lr_decay: Annotated[str, typer.Option(
        help="after the warm-up: constant, or cosine to 0 by the run's end")] = "constant",
    ema: EmaOpt = 0.995,
    task_weight: Annotated[float, typer.Option(help="weight of MSE to the true noise")] = 1.0,
    kd_weight: Annotated[float, typer.Option(help="weight of MSE to the teacher's output")]
    = 1.0,
    feature_weight: Annotated[float, typer.Option(
        help="weight of MSE to the teacher's stage outputs")] = 1.0,
    caption_dropout: Annotated[float | None, typer.Option(
        help="fraction of empty captions (default 0.1; step distillation 0)")] = None,
    conditioning: Annotated[Path | None, typer.Option(
        help="data-free: .safetensors with encoder_hidden_states (N, L, D) [+ uncond]")] = None,
    pool: Annotated[int, typer.Option(
        help="data-free: teacher samples drawn once as training data")] = 256,
    checkpoint_every: CheckpointEveryOpt = 200,
    seed: Annotated[int, typer.Option(help="seed of data, noise and skip draws")] = 0,
    name: Annotated[str | None, typer.Option(help="name of the recovered model")] = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    arch: Annotated[str | None, typer.Option(help="architecture of a bare weights file")]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the training record")] = False,
    sampling_steps: Annotated[int | None, typer.Option(
        help="step distillation: a student sampling in N steps with guidance built in")] = None,
    guidance: Annotated[float | None, typer.Option(
        help="step distillation: CFG scale baked in (default: the model's, else 3)")] = None,
    start_steps: Annotated[int | None, typer.Option(
        help="step distillation: round 1's teacher steps, N x a power of two (default 32)")]
    = None,
    steps_per_round: Annotated[int | None, typer.Option(
        help="step distillation: training steps of each round")] = None,
    minutes_per_round: Annotated[float | None, typer.Option(
        help="step distillation: training minutes of each round")] = None,
    keep_rounds: Annotated[bool, typer.Option(
        help="step distillation: also write each round's student (rounds/<n>-steps/)")]
    = False,
) -> None:
    """Remove blocks and win the quality back by distillation from the original model, or
    distil a model to fewer sampling steps with guidance built in (--sampling-steps).

    Name the blocks (--remove) or let block search pick them for a latency budget (--device,
    --budget), optionally after robust training (--robust-minutes). With --sampling-steps N,
    progressive rounds halve the steps from --start-steps down to N (recover first, then
    distil the recovered folder). Writes a folder that `snapc compile`, `snapc evaluate` and
    diffusers (snapc.pruned.load_pruned_unet) load."""
    from snapc.cli_steps import check_mode, run_step_distillation

    try:
        stepping = check_mode(
            sampling_steps,
            {"--remove": remove, "--budget": budget, "--device": device, "--keep": keep,
             "--steps": steps, "--minutes": minutes, "--robust-steps": robust_steps,
             "--robust-minutes": robust_minutes, "--conditioning": conditioning,
             "--arch": arch, "--screen": screen or None, "--screen-steps": screen_steps,
             "--screen-minutes": screen_minutes},
            {"--guidance": guidance, "--start-steps": start_steps,
             "--steps-per-round": steps_per_round, "--minutes-per-round": minutes_per_round,
             "--keep-rounds": keep_rounds})
    except SnapcError as exc:
        fail(exc)
    if stepping:
        run_step_distillation(
            model=model, output=output, sampling_steps=sampling_steps, guidance=guidance,
            start_steps=start_steps, steps_per_round=steps_per_round,
            minutes_per_round=minutes_per_round, keep_rounds=keep_rounds,
            train_device=train_device, batch=batch, lr=lr, warmup=warmup, lr_decay=lr_decay,
            ema=ema, caption_dropout=caption_dropout, checkpoint_every=checkpoint_every, seed=seed,
            name=name, resume=resume, force=force, json_out=json_out)
        return
    from snapc.train import (
        RecoveryLoss,
        RecoveryOptions,
        RobustOptions,
        TrainOptions,
        distill_recovery,
    )

    options = RecoveryOptions(
        model=model, out=output, remove=tuple(remove or ()), device=device, budget=budget,
        keep=tuple(keep or ()), name=name, conditioning=conditioning, pool=pool, force=force,
        resume=resume, arch=arch, robust=RobustOptions(steps=robust_steps,
                                                       minutes=robust_minutes),
        screen=screen, screen_steps=screen_steps, screen_minutes=screen_minutes)
    train_options = TrainOptions(steps=steps, minutes=minutes, batch=batch, lr=lr,
                                 warmup=warmup, lr_decay=lr_decay, ema=ema, seed=seed,
                                 device=train_device, checkpoint_every=checkpoint_every)
    loss = RecoveryLoss(task=task_weight, output_kd=kd_weight, feature_kd=feature_weight,
                        caption_dropout=0.1 if caption_dropout is None else caption_dropout)

    def checks() -> None:
        options.check()
        train_options.check()
        loss.check()

    record = run_training(checks, lambda progress, report: distill_recovery(
        options, train_options, loss, progress=progress, report=report), json_out)
    if record is None:
        return
    out.print(f"wrote {output}: {len(record['removed_blocks'])} blocks removed, "
              f"{record['steps']} steps in {record['train_seconds']} s, final loss "
              f"{record['final_loss']:.5f}")
