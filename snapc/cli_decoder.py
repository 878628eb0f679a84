"""`snapc compress-decoder`: prune an AutoencoderKL decoder's channels and distil it back.

Parses arguments, builds the options dataclasses and calls snapc.decoder.compress_decoder
under the training progress bar (loss, time left); one-line errors for bad input.
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
    ResumeOpt,
    TrainBatchOpt,
    TrainDeviceOpt,
    WarmupOpt,
    out,
)
from snapc.cli_training import run_training

__all__ = ["compress_decoder_command"]


def compress_decoder_command(
    model: Annotated[str, typer.Argument(
        help="shapes-latent, tiny-vae / sd-vae (random weights), an AutoencoderKL folder or a "
             "pipeline folder with vae/")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder to write")],
    keep: Annotated[float, typer.Option(
        help="fraction of each decoder ResNet's inner channels kept (0.5: half removed)")]
    = 0.5,
    width_keep: Annotated[float, typer.Option(
        help="fraction of the block widths (mid block, each up block) kept; 1: unchanged")]
    = 1.0,
    steps: Annotated[int | None, typer.Option(help="distillation steps")] = None,
    minutes: Annotated[float | None, typer.Option(
        help="distillation minutes (with --steps: whichever ends first); neither: prune only")]
    = None,
    latents: Annotated[Path | None, typer.Option(
        help=".safetensors with 'latents' (N, C, h, w) sampled by the UNet (default: the "
             "encoder on shapes scenes for shapes-latent, else random latents)")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="device whose latency is predicted (repeatable; default "
                         "iphone14pro-ane and adreno740)")] = None,
    train_device: TrainDeviceOpt = "auto",
    batch: TrainBatchOpt = 32,
    lr: LrOpt = 1e-4,
    warmup: WarmupOpt = 100,
    ema: EmaOpt = 0.995,
    pixel_weight: Annotated[float, typer.Option(help="weight of MSE to the teacher's image")]
    = 1.0,
    feature_weight: Annotated[float, typer.Option(
        help="weight of MSE to the teacher's mid/up block outputs")] = 1.0,
    checkpoint_every: CheckpointEveryOpt = 200,
    seed: Annotated[int, typer.Option(help="seed of the latents")] = 0,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the record")] = False,
) -> None:
    """Prune the decoder's ResNet channels and optionally its block widths (--width-keep; L1
    filter norm, per GroupNorm group) and distil it
    from the original on latents (pixel + feature loss); report params, GMACs and predicted
    ms of both. The folder loads with snapc.decoder.load_compressed_vae (a diffusers
    AutoencoderKL)."""
    from snapc.decoder import CompressOptions, DecoderLoss, compress_decoder
    from snapc.train import TrainOptions

    options = CompressOptions(model=model, out=output, keep=keep, width_keep=width_keep,
                              latents=latents,
                              devices=tuple(device or ("iphone14pro-ane", "adreno740")),
                              force=force, resume=resume)
    training = None
    if steps is not None or minutes is not None:
        training = TrainOptions(steps=steps, minutes=minutes, batch=batch, lr=lr,
                                warmup=warmup, ema=ema, seed=seed, device=train_device,
                                checkpoint_every=checkpoint_every)
    loss = DecoderLoss(pixel=pixel_weight, feature=feature_weight)

    def checks() -> None:
        options.check()
        if training is not None:
            training.check()
        loss.check()

    record = run_training(checks, lambda progress, report: compress_decoder(
        options, training, loss, progress=progress, report=report), json_out)
    if record is None:
        return
    fig = record["figures"]
    for label in ("original", "compressed"):
        f = fig[label]
        ms = ", ".join(f"{d} {v:.2f} ms" for d, v in f["ms"].items())
        out.print(f"{label:>10}: {f['params'] / 1e6:.3f} M params, {f['gmacs']:.3f} GMACs, {ms}")
    trained = (f"distilled {record['steps']} steps, final loss "
               f"{record['training']['final_loss']:.5f}" if record["training"]
               else "pruned only (no --steps/--minutes: not distilled)")
    out.print(f"wrote {output}: {record['channels_removed']:.0%} of ResNet inner channels and "
              f"{record['width_removed']:.0%} of block widths removed, {fig['macs_ratio']:.2f}x "
              f"fewer MACs; {trained}")
