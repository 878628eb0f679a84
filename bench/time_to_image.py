"""Time to image on this CPU: `shapes` at 25 DDIM steps with CFG in torch eager vs `shapes-fast`
(pruned, recovered, 4 steps with guidance built in) through its compiled ONNX components.

One run, side by side, image by image: for each validation prompt every contender makes its
image from the same start noise (the `snapc evaluate` protocol: image i depends on i only),
and the contenders take turns, so drift on a shared machine falls on all of them alike. Per
image the clock covers everything from the prompt's token ids to the picture: the text
encoder and every UNet call of the sampler. Reported: median seconds per image, adherence /
exact / FD of each on the same prompts (FD on so few images is only a rough guide), the
predicted ``iphone14pro-ane`` time per image from snapc's cost model (fp16, the UNet's
predicted latency at its call batch x calls per image), and ``speedup`` = the teacher's
median / the best artifact's::

    python bench/time_to_image.py --prompts 100 --write-results

The artifacts are compiled first by the README's commands (``snapc compile shapes-fast
--target onnx --components unet,text_encoder`` with and without ``--quantize w8a8``) into a
temporary folder; writes ``bench/out/time_to_image.json`` and a grid
``bench/out/time_to_image.png`` (the first prompts, one row per contender).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import machine, write_section  # noqa: E402

from snapc.artifacts import atomic_output_file  # noqa: E402

OUT = REPO / "bench" / "out" / "time_to_image.json"
DEVICE = "iphone14pro-ane"
VARIANTS = {"onnx-fp32": [], "onnx-w8a8": ["--quantize", "w8a8"]}


@dataclass
class Contender:
    """One way of making an image: a name, how it runs, and its image-making function."""

    name: str
    runtime: str
    make: Callable[[str, torch.Tensor], torch.Tensor]  # (prompt, noise) -> (1, 3, 32, 32)
    calls_per_image: int
    call_batch: int
    unet_model: str  # what the cost model predicts the UNet of
    seconds: list[float]
    images: list[torch.Tensor]


def _teacher(steps: int, guidance: float) -> Contender:
    """The shipped `shapes`, torch eager: its text encoder and 25 DDIM steps with CFG."""
    from snapc.models import load_model
    from snapc.shapes.model import encode_captions, load_text_encoder
    from snapc.shapes.sampler import sample

    unet = load_model("shapes").module.eval().requires_grad_(False)
    text = load_text_encoder().eval()

    with torch.no_grad():
        uncond = encode_captions([""], text)  # once, as the artifacts' contender does

    @torch.no_grad()
    def make(prompt: str, noise: torch.Tensor) -> torch.Tensor:
        context = encode_captions([prompt], text)
        return sample(unet, context, uncond, steps=steps, guidance=guidance, noise=noise)

    return Contender("shapes (teacher)", f"torch {torch.__version__} eager", make, steps, 2,
                     "shapes", [], [])


def _artifact(name: str, folder: Path) -> Contender:
    """A components artifact (text encoder + UNet on onnxruntime) with its stored sampler."""
    from snapc.generate import load_artifact
    from snapc.shapes.sampler import sample
    from snapc.shapes.text import tokenize

    artifact = load_artifact(folder)
    spec = artifact.sampler
    uncond = None if spec.guidance_embedded else artifact.encode(
        tokenize([artifact.unconditional_prompt]))

    @torch.no_grad()
    def make(prompt: str, noise: torch.Tensor) -> torch.Tensor:
        context = artifact.encode(tokenize([prompt]))
        return sample(artifact.unet, context, uncond, steps=spec.steps, guidance=spec.guidance,
                      noise=noise, spacing=spec.spacing,
                      guidance_embedded=spec.guidance_embedded)

    import onnxruntime

    batch = 1 if spec.guidance_embedded else 2
    return Contender(f"shapes-fast {name}", f"onnxruntime {onnxruntime.__version__} CPU",
                     make, spec.unet_calls_per_image, batch, "shapes-fast", [], [])


def _compile(folder: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "snapc", "compile", "shapes-fast", "--target", "onnx",
           "--components", "unet,text_encoder", *extra, "-o", str(folder), "--force"]
    print("$ snapc", " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@functools.cache  # both shapes-fast artifacts share one UNet: trace and estimate it once
def _predicted_ms(model: str, batch: int) -> float:
    from snapc.compiler import load_graph
    from snapc.cost import CostModel

    cost = CostModel(DEVICE, dtype="fp16")
    return cost.estimate_graph(load_graph(model, batch=batch)).total_ms


def _grid(contenders: list[Contender], prompts: list[str], path: Path, columns: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snapc.plots import save_figure

    columns = min(columns, len(prompts))
    fig, axes = plt.subplots(len(contenders), columns, squeeze=False,
                             figsize=(1.7 * columns, 2.1 * len(contenders)))
    for r, c in enumerate(contenders):
        for j in range(columns):
            ax = axes[r][j]
            image = ((c.images[j][0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(prompts[j].removeprefix("a "), 24), fontsize=5.5)
            if j == 0:
                ax.set_ylabel(f"{c.name}\n{statistics.median(c.seconds) * 1e3:.0f} ms",
                              fontsize=7)
    fig.suptitle("same prompts, same start noise: median time per image on this CPU",
                 fontsize=9)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
    """Compile, time and score every contender; return the JSON record."""
    from snapc.quality import (
        EVAL_SEED,
        frechet_distance,
        image_features,
        load_feature_classifier,
        prompt_adherence,
        validation_codes,
    )
    from snapc.shapes.data import caption, render

    torch.set_num_threads(args.threads)
    where = machine()
    codes = validation_codes(args.prompts)
    prompts = [caption(int(c)) for c in codes]
    seeded = torch.Generator().manual_seed(EVAL_SEED + 1)  # snapc evaluate's start noise
    noise = torch.randn(len(codes), 3, 32, 32, generator=seeded)
    compile_seconds = {}
    with tempfile.TemporaryDirectory(prefix="snapc-tti-") as tmp:
        contenders = [_teacher(args.teacher_steps, args.guidance)]
        for name, extra in VARIANTS.items():
            folder = Path(tmp) / name
            compile_seconds[name] = round(_compile(folder, extra), 1)
            contenders.append(_artifact(name, folder))
        for c in contenders:  # one untimed image each: sessions and caches warm up
            c.make(prompts[0], noise[:1])
        for i, prompt in enumerate(prompts):
            for c in contenders:
                start = time.perf_counter()
                c.images.append(c.make(prompt, noise[i : i + 1]))
                c.seconds.append(time.perf_counter() - start)
            if (i + 1) % 10 == 0 or i + 1 == len(prompts):
                print(f"  {i + 1}/{len(prompts)} images: " + ", ".join(
                    f"{c.name} {statistics.median(c.seconds) * 1e3:.0f} ms"
                    for c in contenders), flush=True)
    classifier = load_feature_classifier()
    real = image_features(classifier, render(codes))
    rows = []
    for c in contenders:
        images = torch.cat(c.images)
        scores = prompt_adherence(images, codes)
        unet_ms = _predicted_ms(c.unet_model, c.call_batch)
        rows.append({
            "name": c.name, "runtime": c.runtime, "unet_calls_per_image": c.calls_per_image,
            "call_batch": c.call_batch, "median_s": statistics.median(c.seconds),
            "min_s": min(c.seconds), "max_s": max(c.seconds),
            "adherence": scores["adherence"], "exact": scores["exact"],
            "fd": frechet_distance(image_features(classifier, images), real),
            "predicted_unet_ms": unet_ms,
            "predicted_ms_per_image": unet_ms * c.calls_per_image})
    teacher, artifacts = rows[0], rows[1:]
    close = [r for r in artifacts if r["adherence"] >= teacher["adherence"] - 0.02]
    best = min(close or artifacts, key=lambda r: r["median_s"])
    for r in rows:
        r["speedup_vs_teacher"] = teacher["median_s"] / r["median_s"]
        r["predicted_speedup_vs_teacher"] = (teacher["predicted_ms_per_image"]
                                             / r["predicted_ms_per_image"])
    png = _grid(contenders, prompts, args.out.with_suffix(".png"), args.grid)
    return {"machine": where, "threads": args.threads, "prompts": args.prompts,
            "teacher_sampler": {"steps": args.teacher_steps, "guidance": args.guidance,
                                "spacing": "linspace"},
            "compile_seconds": compile_seconds, "rows": rows, "best": best["name"],
            "speedup": teacher["median_s"] / best["median_s"],
            "adherence_gap": teacher["adherence"] - best["adherence"],
            "grid": str(png.relative_to(REPO) if png.is_relative_to(REPO) else png)}


def _table(record: dict) -> str:
    lines = ["| contender | runtime | UNet calls x batch | median s / image | speedup | "
             "adherence | exact | FD | predicted iPhone ms / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        lines.append(
            f"| {r['name']} | {r['runtime']} | {r['unet_calls_per_image']} x "
            f"{r['call_batch']} | {r['median_s']:.4f} | {r['speedup_vs_teacher']:.1f}x | "
            f"{r['adherence']:.3f} | {r['exact']:.3f} | {r['fd']:.1f} | "
            f"{r['predicted_ms_per_image']:.1f} ({r['predicted_speedup_vs_teacher']:.1f}x) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, default=10, help="prompts shown in the PNG grid")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--write-results", action="store_true",
                   help="replace the section in bench/RESULTS.md")
    p.add_argument("--report", action="store_true",
                   help="print (and with --write-results record) the last run's JSON; no run")
    args = p.parse_args()
    if args.report:
        record = json.loads(args.out.read_text())
    else:
        record = run(args)
        with atomic_output_file(args.out) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
    body = _body(record)
    print(body)
    if args.write_results:
        write_section("Time to image: shapes-fast vs the 25-step teacher (CPU)", body)
        print("updated bench/RESULTS.md")


def _body(record: dict) -> str:
    teacher = record["teacher_sampler"]
    return (f"`bench/time_to_image.py --prompts {record['prompts']}`, one run on "
            f"{record['machine']}, {record['threads']} threads: each image timed from token "
            "ids to picture (text encoder + every UNet call), contenders taking turns image "
            f"by image, same prompts and start noise. Teacher: `shapes`, {teacher['steps']} "
            f"DDIM steps with CFG {teacher['guidance']:g} (one batch-2 call a step). "
            "`shapes-fast`: 15 blocks removed + 4 trailing steps with guidance built in (one "
            f"batch-1 call a step). Predicted iPhone: snapc's `{DEVICE}` cost model, fp16.\n\n"
            f"{_table(record)}\n\n**speedup {record['speedup']:.1f}x** ({record['best']}; "
            f"adherence {record['adherence_gap']:+.3f} below the teacher's on these prompts; "
            f"FD of {record['prompts']} images is biased upward). "
            f"Grid: `{record['grid']}`.\n" + _image_link(record["grid"]))


def _image_link(grid: str) -> str:
    """A markdown image of the grid, relative to bench/RESULTS.md (none outside bench/)."""
    inside = grid.removeprefix("bench/")
    return "" if inside == grid else f"\n![time to image grid]({inside})\n"


if __name__ == "__main__":
    main()
