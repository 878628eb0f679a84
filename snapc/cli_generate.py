"""`snapc generate`: a typer command registered by ``snapc/cli.py``.

It parses arguments, calls :mod:`snapc.generate` and prints; nothing else. Errors are
SnapcError one-liners with exit code 2, checked before anything is written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from snapc.cli_common import ForceOpt, err, fail, out
from snapc.errors import SnapcError

__all__ = ["generate_command"]


def generate_command(
    artifact: Annotated[Path, typer.Argument(
        help="artifact folder of `snapc compile MODEL --target onnx|x86 --components "
             "unet,text_encoder[,vae_decoder] -o DIR`")],
    output: Annotated[Path, typer.Option("--output", "-o",
                                         help="folder to create: NNN.png per prompt, grid.png, "
                                              "results.json")],
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="a prompt (repeatable), e.g. 'a small red circle at the top left'")]
    = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="a text file with one prompt per line (after any --prompt)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the start noise")] = 0,
    steps: Annotated[int | None, typer.Option(
        help="DDIM steps (default: the manifest's sampler)")] = None,
    guidance: Annotated[float | None, typer.Option(
        help="CFG scale (default: the manifest's sampler)")] = None,
    force: ForceOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Generate one image per prompt with the compiled components of ARTIFACT (ONNX on
    onnxruntime, TVM x86 through its VM; a pipeline's VAE decoder turns latents into the
    picture)."""
    from snapc.artifacts import check_output_dir
    from snapc.evaluation import resolve_sampler
    from snapc.generate import generate, load_artifact, read_prompts, write_images

    start = time.perf_counter()
    try:
        prompts = list(prompt or [])
        if prompts_file is not None:
            prompts += read_prompts(prompts_file)
        if not prompts:
            raise SnapcError("no prompts; give --prompt TEXT (repeatable) or --prompts-file "
                             "FILE")
        check_output_dir(output, force)
        if steps is not None and steps < 1:
            raise SnapcError(f"--steps must be >= 1, not {steps}")
        loaded = load_artifact(artifact)  # runtimes start on first use
        loaded.tokenize(prompts)  # every prompt checked before anything runs
        spec = resolve_sampler(loaded.sampler, steps=steps, guidance=guidance)
        if loaded.random_weights:
            err.print(f"[yellow]warning:[/] model '{loaded.name}' has random weights: its "
                      "pictures are noise", soft_wrap=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=err) as bar:
            tasks = [bar.add_task(f"image {i + 1}/{len(prompts)}", total=spec.steps,
                                  visible=False, start=False) for i in range(len(prompts))]

            def progress(image: int, done: int, total: int) -> None:
                if done == 1:
                    bar.start_task(tasks[image])
                bar.update(tasks[image], completed=done, total=total, visible=True)

            images, records = generate(loaded, prompts, seed=seed, steps=steps,
                                       guidance=guidance, progress=progress)
        matched = [r["matches"] for r in records if r.get("matches") is not None]
        summary = {"artifact": str(artifact), "model": loaded.name, "base": loaded.base,
                   "sampler": spec.to_json(), "seed": seed, "prompts": len(prompts),
                   "runtime": loaded.runtime}
        if loaded.shapes:
            summary |= {"scored": len(matched), "matched": sum(matched),
                        "match_rate": sum(matched) / len(matched) if matched else None}
        summary["seconds"] = round(time.perf_counter() - start, 2)
        grid_scale = max(1, 128 // int(images.shape[-1]))
        result = write_images(output, images, records, force=force, summary=summary,
                              grid_scale=grid_scale)
    except SnapcError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    line = f"snapc generate {artifact}: {len(prompts)} image(s) in {output}"
    if result.get("match_rate") is not None:
        line += (f", {result['matched']}/{result['scored']} match their prompt as decoded")
    out.print(line + f" ({result['seconds']:.1f} s)", highlight=False)
