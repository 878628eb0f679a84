"""A sample grid of shapes-latent: validation prompts, the scene each asks for, the picture.

    python bench/shapes_latent_samples.py [--prompts 12] [--weights DIR] [--out PNG]
    python bench/shapes_latent_samples.py --student bench/out/step_distill_latent/student-4 \
        --out bench/out/step_distill_latent_samples.png

Top row: the prompt's scene as the renderer draws it; next row: what the whole pipeline
(text encoder, latent UNet at 25 DDIM steps with CFG 3, VAE decoder) made of the prompt on this
CPU, titled "exact" when the scene decoder reads back every attribute of the prompt. With
``--student DIR`` (a step-distilled latent UNet folder) a third row shows that UNet's pictures
with its own stored sampler, same prompts and seed, through the same encoder and decoder.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapc.shapes_latent.config import WEIGHTS_DIR  # noqa: E402

OUT = REPO / "bench" / "shapes_latent_samples.png"


def main() -> None:
    """Generate the prompts' pictures and draw the grid."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--student", type=Path, help="a distilled shapes-latent UNet folder")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snapc.plots import save_figure
    from snapc.quality import validation_codes
    from snapc.shapes.data import caption, decode, match_score, objects_of
    from snapc.shapes_latent.config import scenes, to_shapes_resolution
    from snapc.shapes_latent.pipeline import generate, load_pipeline

    vae, unet, text = load_pipeline(args.weights)
    codes = validation_codes(args.prompts)
    prompts = [caption(int(c)) for c in codes]
    _, images = generate(vae, unet, text, prompts)
    rows = [("asked for", scenes(codes)), ("shapes-latent", images)]
    title = "25 DDIM steps, CFG 3"
    if args.student is not None:
        from snapc.evaluation_latent import latent_images, load_latent_pipeline

        student = load_latent_pipeline(str(args.student))
        rows.append((args.student.name, latent_images(student, codes)[1]))
        spec = student.sampler
        title += f"; {args.student.name}: {spec.steps} {spec.spacing} steps, one call each"
    fig, axes = plt.subplots(len(rows), len(prompts), squeeze=False,
                             figsize=(1.6 * len(prompts), 1.95 * len(rows)))
    exact = [0] * len(rows)
    for j, prompt in enumerate(prompts):
        axes[0][j].set_title(textwrap.fill(prompt.removeprefix("a "), 22), fontsize=5.5)
        for r, (_, pictures) in enumerate(rows):
            ax = axes[r][j]
            ax.imshow(((pictures[j].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                continue
            found = decode(to_shapes_resolution(pictures[j:j + 1]))[0]
            hits, total = match_score(objects_of(int(codes[j])), found)
            exact[r] += hits == total
            ax.set_xlabel("exact" if hits == total else f"{hits}/{total} attributes",
                          fontsize=6.5, color="green" if hits == total else "red")
    for r, (label, _) in enumerate(rows):
        axes[r][0].set_ylabel(label if r == 0 else f"{label}\n{exact[r]}/{len(prompts)} exact",
                              fontsize=7)
    fig.suptitle(f"shapes-latent on {len(prompts)} validation prompts ({title}, seed 0)",
                 fontsize=9)
    counts = ", ".join(f"{label} {n}/{len(prompts)} exact" for (label, _), n
                       in zip(rows[1:], exact[1:], strict=True))
    print(f"wrote {save_figure(fig, args.out)} ({counts})")


if __name__ == "__main__":
    main()
