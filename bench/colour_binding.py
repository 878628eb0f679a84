"""Where the shapes model loses two-object colour binding: at which noise level colours are
decided, and whether the caption can still change them there (CPU, a few minutes).

On N two-object validation prompts whose objects differ in colour (the only scenes where a
swap is possible), with the shipped sampler's update (DDIM, eta 0, x0 clipped, CFG 3):

  from noise     the evaluation protocol (25 steps from t = 999): exact and colour accuracy
  re-noised      the ground-truth image noised to t, then 12 DDIM steps from t to 0 with its
                 own caption: exact; where this falls to chance, colours are decided above t
  swapped        the image with the two colours exchanged, noised to t, denoised with the
                 *true* caption: the share that follows the caption (corrects the swap) vs
                 the share that keeps the image's colours

Writes ``bench/out/colour_binding.json`` and, with --write-results, the
``## Colour binding (shapes)`` section of bench/RESULTS.md.

    python bench/colour_binding.py --prompts 100 --write-results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench.results, when run as a script

NOISED_T = (700, 850, 930, 970, 990)
SWAPPED_T = (700, 850, 930)
GUIDANCE = 3.0


def _two_colour_codes(n: int) -> torch.Tensor:
    """The first n validation codes of two objects of different colours."""
    from snapc.quality import validation_codes
    from snapc.shapes.data import N_OBJECTS, objects_of

    codes = validation_codes(20 * n)
    keep = [int(c) for c in codes if c >= N_OBJECTS
            and len({o.colour for o in objects_of(int(c))}) == 2]
    if len(keep) < n:
        raise SystemExit(f"only {len(keep)} such validation prompts; ask for fewer")
    return torch.tensor(keep[:n])


def _swapped(code: int) -> int:
    """The scene code with the two objects' colours exchanged."""
    from snapc.shapes.data import COLOURS, N_OBJECTS

    per_colour = N_OBJECTS // len(COLOURS)  # object o = colour * per_colour + the rest
    first, second = divmod(code - N_OBJECTS, N_OBJECTS)
    c1, c2 = first // per_colour, second // per_colour
    first += (c2 - c1) * per_colour
    second += (c1 - c2) * per_colour
    return N_OBJECTS + first * N_OBJECTS + second


@torch.no_grad()
def _denoise_from(unet: torch.nn.Module, x0: torch.Tensor, t_start: int,
                  context: torch.Tensor, uncond: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """Noise x0 to t_start and run the shipped sampler (DDIM, eta 0, x0 clipped, CFG) from
    there to t = 0 in ``steps`` steps."""
    from snapc.shapes.sampler import sample
    from snapc.shapes.schedule import add_noise

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    x = add_noise(x0, noise, torch.full((len(x0),), t_start))
    times = [round(t_start * (1 - i / steps)) for i in range(steps + 1)]
    return sample(unet, context, uncond, guidance=GUIDANCE, noise=x, timesteps=times)


def _markdown(result: dict, host: str) -> str:
    rows = [f"| from noise (t = 999, 25 steps) | {result['from_noise']['exact']:.3f} | "
            f"{result['from_noise']['colour']:.3f} | |"]
    for t, r in result["renoised"].items():
        rows.append(f"| ground truth re-noised to t = {t} (sqrt(a) {r['signal']:.3f}) | "
                    f"{r['exact']:.3f} | {r['colour']:.3f} | |")
    for t, r in result["swapped"].items():
        rows.append(f"| colours swapped, re-noised to t = {t}, true caption | "
                    f"{r['follows_caption']:.3f} | | keeps the image: {r['keeps_image']:.3f} |")
    return "\n".join([
        f"`python bench/colour_binding.py --prompts {result['prompts']}` on {host}; "
        f"{result['prompts']} two-object validation prompts whose objects differ in colour, "
        f"CFG {GUIDANCE:g}, shipped `shapes` weights ({result['seconds']:.0f} s).",
        "",
        "| start | exact | colour | |",
        "|---|---:|---:|---|",
        *rows,
    ])


def main() -> None:
    """Run the three measurements; print, write the JSON and optionally the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.results import machine, write_section
    from snapc.quality import generate, prompt_adherence
    from snapc.shapes.data import caption, render
    from snapc.shapes.model import encode_captions, load_text_encoder, load_unet
    from snapc.shapes.schedule import alphas_cumprod

    host = machine()
    start = time.perf_counter()
    unet, text = load_unet(), load_text_encoder()
    codes = _two_colour_codes(args.prompts)
    context = encode_captions([caption(int(c)) for c in codes], text)
    uncond = encode_captions([""], text).expand_as(context)
    images = generate(unet, text, codes, guidance=GUIDANCE, batch=len(codes))
    result: dict = {"prompts": args.prompts, "machine": host,
                    "from_noise": prompt_adherence(images, codes), "renoised": {},
                    "swapped": {}}
    print("from noise", result["from_noise"], flush=True)
    truth = render(codes)
    for t in NOISED_T:
        scores = prompt_adherence(_denoise_from(unet, truth, t, context, uncond), codes)
        scores["signal"] = float(alphas_cumprod()[t].sqrt())
        result["renoised"][str(t)] = scores
        print(f"re-noised t={t}", scores, flush=True)
    swapped = torch.tensor([_swapped(int(c)) for c in codes])
    wrong = render(swapped)
    for t in SWAPPED_T:
        out = _denoise_from(unet, wrong, t, context, uncond)
        result["swapped"][str(t)] = {"follows_caption": prompt_adherence(out, codes)["exact"],
                                     "keeps_image": prompt_adherence(out, swapped)["exact"]}
        print(f"swapped t={t}", result["swapped"][str(t)], flush=True)
    result["seconds"] = time.perf_counter() - start
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "colour_binding.json").write_text(json.dumps(result, indent=1))
    print(_markdown(result, host))
    if args.write_results:
        write_section("Colour binding (shapes)", _markdown(result, host))


if __name__ == "__main__":
    main()
