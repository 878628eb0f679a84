"""`snapc distill --sampling-steps N`: the step-distillation side of `snapc distill`.

`snapc distill` does one of two things, chosen by its flags before anything loads:
recovery (``--remove`` / ``--budget``: win back what block removal lost) or step
distillation (``--sampling-steps``: a student that samples in N steps with guidance built
in). The two do not mix in one run: recover first, then distil the recovered folder. This
module checks which one was asked for and runs the step-distillation one
(snapc.train.distill_steps) with the same progress bar, errors and output as recovery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapc.cli_common import out
from snapc.errors import SnapcError

__all__ = ["STEP_FLAGS", "check_mode", "run_step_distillation"]

# Flags of step distillation alone (CLI spelling -> value given, None when not).
STEP_FLAGS = ("--guidance", "--start-steps", "--steps-per-round", "--minutes-per-round",
              "--keep-rounds")


def _given(flags: dict[str, Any]) -> list[str]:
    return [name for name, value in flags.items() if value not in (None, False, (), [])]


def check_mode(sampling_steps: int | None, recovery_flags: dict[str, Any],
               step_flags: dict[str, Any]) -> bool:
    """Return True for step distillation, False for recovery; raise SnapcError (one line)
    for flags of the other mode. ``*_flags`` map CLI spellings to the values given."""
    if sampling_steps is None:
        wrong = _given(step_flags)
        if wrong:
            raise SnapcError(f"{wrong[0]} is a step-distillation flag: add --sampling-steps N")
        return False
    given = _given(recovery_flags)
    if any(f in given for f in ("--remove", "--budget", "--device", "--keep")):
        raise SnapcError("--sampling-steps does not mix with block removal in one run: recover "
                         "first (snapc distill MODEL --budget F --device D -o R), then distil "
                         "the folder (snapc distill R --sampling-steps N -o OUT)")
    if given:
        hint = {"--steps": "--steps-per-round", "--minutes": "--minutes-per-round"}
        fix = f"use {hint[given[0]]}" if given[0] in hint else "drop it"
        raise SnapcError(f"{given[0]} is a recovery flag, not one of step distillation; {fix}")
    return True


def run_step_distillation(*, model: str, output: Path, sampling_steps: int,
                          guidance: float | None, start_steps: int | None,
                          steps_per_round: int | None, minutes_per_round: float | None,
                          keep_rounds: bool, train_device: str, batch: int, lr: float,
                          warmup: int, lr_decay: str, ema: float, caption_dropout: float | None,
                          checkpoint_every: int, seed: int, name: str | None, resume: bool,
                          force: bool, json_out: bool) -> None:
    """Run `snapc distill MODEL --sampling-steps N` and print its result (or one error line)."""
    from snapc.train import StepLoss, StepOptions, TrainOptions, distill_steps

    loss = StepLoss(caption_dropout=0.0 if caption_dropout is None else caption_dropout)
    options = StepOptions(model=model, out=output, sampling_steps=sampling_steps,
                          guidance=guidance, start_steps=start_steps, name=name,
                          keep_rounds=keep_rounds, force=force, resume=resume, loss=loss)
    train_options = TrainOptions(steps=steps_per_round, minutes=minutes_per_round, batch=batch,
                                 lr=lr, warmup=warmup, lr_decay=lr_decay, ema=ema, seed=seed,
                                 device=train_device,
                                 checkpoint_every=checkpoint_every)
    from snapc.cli_training import run_training

    def checks() -> None:
        if train_options.steps is None and train_options.minutes is None:
            raise SnapcError("give each round a length: --steps-per-round K or "
                             "--minutes-per-round M")
        if steps_per_round is not None and steps_per_round < 1:
            raise SnapcError(f"--steps-per-round must be >= 1, not {steps_per_round}")
        if minutes_per_round is not None and not minutes_per_round > 0:
            raise SnapcError(f"--minutes-per-round must be > 0, not {minutes_per_round}")
        options.check()
        train_options.check()

    record = run_training(checks, lambda progress, report: distill_steps(
        options, train_options, progress=progress, report=report), json_out)
    if record is None:
        return
    sampler = record["sampler"]
    plan = record["plan"]
    out.print(f"wrote {output}: {plan['start_steps']} -> {sampler['steps']} steps in "
              f"{len(record['rounds'])} round(s), guidance {sampler['guidance']:g} built in "
              f"({sampler['steps']} UNet calls per image), {record['steps']} training steps in "
              f"{record['train_seconds']} s, final loss {record['final_loss']:.5f}")
