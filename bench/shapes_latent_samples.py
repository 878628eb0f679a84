"""A sample grid of shapes-latent: validation prompts, the scene each asks for, the picture.

    python bench/shapes_latent_samples.py [--prompts 12] [--weights DIR] [--out PNG]

Top row: the prompt's scene as the renderer draws it; bottom row: what the whole pipeline
(text encoder, latent UNet at 25 DDIM steps with CFG 3, VAE decoder) made of the prompt on this
CPU, titled "exact" when the scene decoder reads back every attribute of the prompt.
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
    found = decode(to_shapes_resolution(images))
    fig, axes = plt.subplots(2, len(prompts), squeeze=False, figsize=(1.6 * len(prompts), 3.9))
    exact = 0
    for j, (code, prompt) in enumerate(zip(codes.tolist(), prompts, strict=True)):
        hits, total = match_score(objects_of(int(code)), found[j])
        exact += hits == total
        for r, image in enumerate([scenes(codes[j:j + 1])[0], images[j]]):
            ax = axes[r][j]
            ax.imshow(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(textwrap.fill(prompt.removeprefix("a "), 22), fontsize=5.5)
        axes[1][j].set_title("exact" if hits == total else f"{hits}/{total} attributes",
                             fontsize=6.5, color="green" if hits == total else "red")
    axes[0][0].set_ylabel("asked for", fontsize=8)
    axes[1][0].set_ylabel("shapes-latent", fontsize=8)
    fig.suptitle(f"shapes-latent on {len(prompts)} validation prompts: {exact} exact "
                 "(25 DDIM steps, CFG 3, seed 0)", fontsize=9)
    print(f"wrote {save_figure(fig, args.out)} ({exact}/{len(prompts)} exact)")


if __name__ == "__main__":
    main()
