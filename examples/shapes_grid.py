"""Sample the shipped shapes model for a few prompts, next to the same model with one
cross-attention block removed, and save the grid as a PNG.

    python examples/shapes_grid.py --out shapes_grid.png --remove down_blocks.2.attentions.1

Rows are prompts; columns are the ground truth, the original model, and the edited model. The
edit uses snapc's RemoveBlocks pass on the traced graph (`--by-hand` swaps the module by hand
instead, the reference the pass must equal: `snapc.shapes.model.without_block`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from snapc.frontend import trace
from snapc.passes import RemoveBlocks
from snapc.pipeline import PassContext
from snapc.quality import generate, validation_codes
from snapc.runtime import GraphFunction
from snapc.shapes.data import caption, render
from snapc.shapes.model import example_inputs, load_text_encoder, load_unet, without_block


def _removed(unet: torch.nn.Module, block: str, batch: int) -> GraphFunction:
    """Return the UNet with `block` removed by snapc's RemoveBlocks pass, callable at any
    batch size."""
    graph = trace(unet, example_inputs(batch))
    return GraphFunction(RemoveBlocks([block]).run(graph, PassContext()).graph)


def main() -> None:
    """Write the grid PNG and print the prompts of its rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("shapes_grid.png"))
    p.add_argument("--remove", default="down_blocks.2.attentions.1")
    p.add_argument("--prompts", type=int, default=4, help="first N validation prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG")
    p.add_argument("--by-hand", action="store_true", help="swap the module by hand instead")
    args = p.parse_args()

    unet, text = load_unet(), load_text_encoder()
    n = args.prompts
    edited = without_block(unet, args.remove) if args.by_hand else _removed(unet, args.remove, n)
    codes = validation_codes(n)
    kwargs = {"steps": args.steps, "guidance": args.guidance, "batch": n, "batch_cfg": False}
    columns = [render(codes), generate(unet, text, codes, **kwargs),
               generate(edited, text, codes, **kwargs)]
    grid = torch.cat([torch.cat(list(col), 1) for col in columns], 2)  # (3, N*32, 3*32)
    pixels = ((grid.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
    image = Image.fromarray(pixels)
    size = (image.width * args.scale, image.height * args.scale)
    image.resize(size, Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: columns ground truth | original | without {args.remove}")
    for i, code in enumerate(codes.tolist()):
        print(f"row {i}: {caption(code)}")


if __name__ == "__main__":
    main()
