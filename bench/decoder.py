"""Decoder compression on shapes-latent: original vs 50% / 75% of decoder channels removed.

A variant ``K:W`` keeps K of every ResNet's inner channels and W of every block width (the
default 0.5:0.5 and 0.25:0.25 remove 50% and 75% of both).

Per decoder: params, GMACs and predicted ``iphone14pro-ane`` / ``adreno740`` ms (snapc's cost
model, fp16, one 16x16x4 latent), and whole-pipeline prompt adherence and FD (``--prompts``
validation prompts, 25 DDIM steps, CFG 3: the same UNet latents decoded by each decoder).
Compressed decoders come from ``snapc.decoder.compress_decoder`` with data distillation on
latents the UNet samples from training prompts (SnapFusion's data distillation). Rows go to
``bench/out/decoder.json`` as each finishes; rows already there are skipped::

    python bench/decoder.py --minutes 5 --train-device cuda    # GPU: trained shapes-latent
    python bench/decoder.py --figures-only                     # CPU: cost figures only, on
                                                               # random weights (tiny-vae, sd-vae)
    python bench/decoder.py --table [--write-results]          # markdown (bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapc.artifacts import atomic_output_file  # noqa: E402
from snapc.shapes_latent.config import WEIGHTS_DIR  # noqa: E402

OUT = REPO / "bench" / "out" / "decoder.json"  # --rows overrides (smoke runs)
WORK = REPO / "out" / "decoder-bench"
DEVICES = ("iphone14pro-ane", "adreno740")


def _use_rows(path: Path) -> None:
    global OUT
    OUT = path


def _load_rows() -> list[dict]:
    return json.loads(OUT.read_text())["rows"] if OUT.is_file() else []


def _write_rows(rows: list[dict], machine: str) -> None:
    with atomic_output_file(OUT) as tmp:
        tmp.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


def _add_row(row: dict, machine: str) -> None:
    row = {**row, "ran_on": machine}  # rows of one file can come from different machines
    rows = [r for r in _load_rows() if r["key"] != row["key"]] + [row]
    _write_rows(rows, machine)
    print(json.dumps(row), flush=True)


def _variant(text: str) -> tuple[float, float]:
    keep, _, width = text.partition(":")
    return float(keep), float(width or 1.0)


def _key(model: str, keep: float, width: float) -> str:
    return f"{model}@{keep:g}:{width:g}"


def figures_only(variants: list[tuple[float, float]], machine: str) -> None:
    """Rows of params / GMACs / predicted ms for random-weight decoders (no quality)."""
    import warnings

    from snapc.decoder import decoder_figures, load_vae, prune_decoder

    for model in ("tiny-vae", "sd-vae"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loaded = load_vae(model)
        for keep, width in [(1.0, 1.0), *variants]:
            vae, record = prune_decoder(loaded.vae, keep, width)
            row = {"key": _key(model, keep, width), "model": model, "keep": keep,
                   "width_keep": width,
                   "channels_removed": round(record.channels_removed("inner"), 4),
                   "width_removed": round(record.channels_removed("stream"), 4),
                   "random_weights": True, "distilled": False,
                   **decoder_figures(vae, loaded.latent_hw, DEVICES)}
            _add_row(row, machine)


def _distill_latents(pipeline: tuple, n: int, device: str) -> Path:
    """Return a file of ``n`` raw latents the UNet samples from training prompts (made once)."""
    from safetensors.torch import save_file

    from snapc.shapes.data import caption, sample_codes
    from snapc.shapes_latent.pipeline import generate

    path = WORK / f"distill_latents_{n}.safetensors"
    if path.is_file():
        return path
    vae, unet, text = pipeline
    codes = sample_codes(n, split="train", generator=torch.Generator().manual_seed(1))
    latents, _ = generate(vae, unet, text, [caption(int(c)) for c in codes], seed=1,
                          device=device)
    with atomic_output_file(path) as tmp:
        save_file({"latents": (latents / vae.config.scaling_factor).contiguous()}, str(tmp))
    return path


def _quality(decoder, latents: torch.Tensor, codes: torch.Tensor, device: str) -> dict:
    from snapc.quality import (
        frechet_distance,
        image_features,
        load_feature_classifier,
        prompt_adherence,
    )
    from snapc.shapes.data import render
    from snapc.shapes_latent.config import to_shapes_resolution

    decoder = decoder.to(device).eval()
    images = []
    with torch.no_grad():
        for z in latents.split(250):
            out = decoder.decode(z.to(device) / decoder.config.scaling_factor).sample
            images.append(to_shapes_resolution(out.clamp(-1, 1)).cpu())
    images = torch.cat(images)
    classifier = load_feature_classifier()
    scores = prompt_adherence(images, codes)
    scores["fd"] = frechet_distance(image_features(classifier, images),
                                    image_features(classifier, render(codes)))
    return {k: round(v, 4) for k, v in scores.items()}


def run(args, machine: str) -> None:
    """Compress shapes-latent's decoder at each keep, evaluate every decoder, write rows."""
    from snapc.decoder import CompressOptions, DecoderLoss, compress_decoder, decoder_figures
    from snapc.decoder.io import load_compressed_vae
    from snapc.quality import validation_codes
    from snapc.shapes.data import caption
    from snapc.shapes_latent.config import LATENT_SIZE
    from snapc.shapes_latent.pipeline import generate, load_pipeline
    from snapc.train import TrainOptions

    model = "shapes-latent" if args.weights == WEIGHTS_DIR else str(args.weights / "vae")
    pipeline = tuple(m.to(args.train_device) for m in load_pipeline(args.weights))
    vae, unet, text = pipeline
    codes = validation_codes(args.prompts)
    latents, _ = generate(vae, unet, text, [caption(int(c)) for c in codes],
                          device=args.train_device)
    done = {r["key"] for r in _load_rows()}
    if _key("shapes-latent", 1.0, 1.0) not in done:
        row = {"key": _key("shapes-latent", 1.0, 1.0), "model": "shapes-latent", "keep": 1.0,
               "width_keep": 1.0, "channels_removed": 0.0, "width_removed": 0.0,
               "random_weights": False, "distilled": False,
               **decoder_figures(vae.cpu(), (LATENT_SIZE, LATENT_SIZE), DEVICES),
               "quality": _quality(vae, latents, codes, args.train_device),
               "prompts": args.prompts}
        _add_row(row, machine)
    distill = _distill_latents(pipeline, args.distill_latents, args.train_device)
    for keep, width in args.variants:
        key = _key("shapes-latent", keep, width)
        if key in done:
            continue
        out = WORK / f"keep-{keep:g}-width-{width:g}"
        record = compress_decoder(
            CompressOptions(model, out, keep=keep, width_keep=width, latents=distill,
                            devices=DEVICES, force=True),
            TrainOptions(minutes=args.minutes, batch=args.batch, lr=args.lr, warmup=100,
                         device=args.train_device, checkpoint_every=500),
            DecoderLoss(pixel=1.0, feature=args.feature_weight))
        row = {"key": key, "model": "shapes-latent", "keep": keep, "width_keep": width,
               "channels_removed": record["channels_removed"],
               "width_removed": record["width_removed"], "random_weights": False,
               "distilled": True, **record["figures"]["compressed"],
               "training": {k: record["training"][k] for k in ("steps", "train_seconds",
                                                               "final_loss")},
               "quality": _quality(load_compressed_vae(out), latents, codes,
                                   args.train_device),
               "prompts": args.prompts, "folder": str(out.relative_to(REPO))}
        _add_row(row, machine)


def table() -> str:
    """Return the markdown table of the rows (MACs relative to each model's own original)."""
    rows = _load_rows()
    original = {r["model"]: r["gmacs"] for r in rows if r["keep"] == 1.0 and r["width_keep"] == 1.0}
    lines = ["| decoder | ResNet / width channels removed | params (M) | GMACs | "
             "MACs vs original | iphone14pro-ane ms | adreno740 ms | distilled | adherence | FD | "
             "weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], -r["keep"], -r["width_keep"])):
        q = r.get("quality") or {}
        trained = r.get("training")
        minutes = f"{trained['train_seconds'] / 60:g} min" if trained else "-"
        fewer = original.get(r["model"], r["gmacs"]) / r["gmacs"]
        fewer_text = f"{fewer:.2f}x fewer" if r["keep"] < 1.0 or r["width_keep"] < 1.0 else "-"
        lines.append(
            f"| {r['model']} | {r['channels_removed']:.0%} / {r['width_removed']:.0%} | "
            f"{r['params'] / 1e6:.3f} | {r['gmacs']:.3f} | {fewer_text} | "
            f"{r['ms']['iphone14pro-ane']:.2f} | {r['ms']['adreno740']:.2f} | "
            f"{minutes} | "
            f"{q.get('adherence', '-')} | {round(q['fd'], 1) if 'fd' in q else '-'} | "
            f"{'random (cost only)' if r['random_weights'] else 'trained'} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments and run the chosen mode."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", type=_variant, nargs="*",
                   default=[(0.5, 0.5), (0.25, 0.25)],
                   help="KEEP:WIDTH_KEEP pairs (0.5:0.5 removes 50%% of both)")
    p.add_argument("--minutes", type=float, default=5.0, help="distillation minutes each")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--distill-latents", type=int, default=4096,
                   help="UNet latents sampled once as distillation data")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                   help="shapes-latent folder (default: the shipped one)")
    p.add_argument("--rows", type=Path, default=OUT, help="rows file (default %(default)s)")
    p.add_argument("--train-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--figures-only", action="store_true",
                   help="params / GMACs / predicted ms on random-weight decoders (CPU)")
    p.add_argument("--table", action="store_true", help="print the markdown table")
    p.add_argument("--write-results", action="store_true",
                   help="with --table: write it into bench/RESULTS.md")
    args = p.parse_args()
    _use_rows(args.rows)
    from results import machine, write_section

    if args.table:
        body = table()
        print(body)
        if args.write_results:
            write_section("Decoder compression", body)
        return
    if args.figures_only:
        figures_only(args.variants, machine())
    elif args.train_device.startswith("cuda"):
        run(args, f"{machine()}; GPU {torch.cuda.get_device_name()}")
    else:
        run(args, machine())


if __name__ == "__main__":
    main()
