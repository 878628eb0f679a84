"""`snapc evaluate`: a typer command registered by ``snapc/cli.py``.

It parses arguments, calls :func:`snapc.evaluation.evaluate_model` and prints; nothing else.
Errors are SnapcError one-liners with exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from snapc.cli_common import err, fail, out
from snapc.errors import SnapcError

__all__ = ["evaluate_command"]

_METRICS = ("adherence", "exact", "count", "colour", "shape", "size", "position")


def evaluate_command(
    model: Annotated[str, typer.Argument(
        help="shapes or a shapes-* name, a pruned-UNet folder of a shapes base, an ONNX "
             "artifact folder compiled from one, or shapes-latent (or a folder of its layout)")],
    prompts: Annotated[int, typer.Option(
        help="validation prompts (the published figures use 1000)")] = 200,
    steps: Annotated[int | None, typer.Option(
        help="DDIM steps (default: the model's stored sampler, else 25)")] = None,
    guidance: Annotated[float | None, typer.Option(
        help="CFG scale (default: the model's stored sampler, else 3)")] = None,
    spacing: Annotated[str | None, typer.Option(
        help="timestep spacing, linspace or trailing (default: the model's, else linspace)")]
    = None,
    alpha_floor: Annotated[float | None, typer.Option(
        help="divide each step's x0 estimate by max(sqrt(alpha_bar), F) (default: the "
             "model's, else 0; step-distilled shapes-latent students store 0.05)")] = None,
    eval_device: Annotated[str, typer.Option(
        help="cpu or cuda for torch models (ONNX artifacts run on onnxruntime CPU)")] = "cpu",
    batch: Annotated[int | None, typer.Option(
        help="prompts per sampling chunk (default 250; an artifact uses its own batch)")]
    = None,
    seed: Annotated[int, typer.Option(help="seed of the start noise")] = 0,
    decoder: Annotated[str | None, typer.Option(
        help="shapes-latent only: decode with this decoder folder instead (snapc "
             "compress-decoder -o DIR); same prompts and start noise")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Score MODEL's prompt adherence and Fréchet distance on the shapes validation prompts
    (shapes-latent: the whole pipeline, decoder included, or with --decoder DIR)."""
    from snapc.evaluation import check_request, evaluate_model, load_denoiser
    from snapc.evaluation_latent import (
        check_latent_request,
        evaluate_latent,
        is_latent_model,
        load_latent_pipeline,
    )

    try:
        check_request(prompts=prompts, steps=steps, spacing=spacing, batch=batch,
                      device=eval_device, alpha_floor=alpha_floor)
        latent = is_latent_model(model)
        if latent:
            check_latent_request(prompts=prompts, steps=steps, spacing=spacing, batch=batch,
                                 alpha_floor=alpha_floor)
        if decoder is not None and not latent:
            raise SnapcError(f"--decoder replaces the decoder of a latent pipeline; '{model}' "
                             "samples in pixel space: drop --decoder or evaluate shapes-latent")
        with err.status(f"loading {model}"):
            loaded = (load_latent_pipeline(model, decoder=decoder, device=eval_device)
                      if latent else load_denoiser(model, eval_device))
        if not latent and loaded.random_weights:
            err.print(f"[yellow]warning:[/] model '{loaded.name}' has random weights: its "
                      "scores say nothing about a trained model", soft_wrap=True)
        with Progress(TextColumn("sampling"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} images"), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("sampling", total=prompts)
            evaluate = evaluate_latent if latent else evaluate_model
            result = evaluate(
                loaded, prompts=prompts, steps=steps, guidance=guidance, spacing=spacing,
                alpha_floor=alpha_floor, batch=batch, seed=seed,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    except SnapcError as exc:
        fail(exc)
    result["model"] = model
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    guided = (f"guidance {result['guidance']:g} built in" if result["guidance_embedded"]
              else f"CFG {result['guidance']:g}")
    out.print(f"snapc evaluate {model}: base {result['base']}, {result['prompts']} prompts, "
              f"{result['steps']} {result['spacing']} DDIM steps, {guided}, {result['device']}"
              + (f", alpha floor {result['alpha_floor']:g}" if result["alpha_floor"] else "")
              + (f", decoder {result['decoder']}" if "decoder" in result else ""))
    view = Table()
    view.add_column("metric")
    view.add_column("value", justify="right")
    for key in _METRICS:
        view.add_row(key, f"{result[key]:.3f}")
    view.add_row("FD", f"{result['fd']:.1f}")
    view.add_row("UNet calls per image", str(result["unet_calls_per_image"]))
    if "decoder_params" in result:
        view.add_row("decoder params", f"{result['decoder_params']:,}")
    view.add_row("seconds", f"{result['seconds']:.1f}")
    out.print(view)
