"""Train the shapes reference model: text encoder + UNet (DDPM, epsilon prediction, CFG dropout)
and the feature classifier of the Fréchet distance; export fp16 safetensors.

    python examples/train_shapes.py --device cuda --minutes 7.5 --out out/shapes

Data are rendered on the fly on the training device. With ``--resume DIR`` training continues
from exported weights (model and EMA both start from DIR's EMA weights; the optimizer restarts
with a warm-up) and the classifier is copied over. Writes to --out: unet.safetensors,
text_encoder.safetensors, classifier.safetensors (fp16, EMA weights) and training.json (the
command, seed, steps, final loss, device, and a guidance sweep of prompt adherence).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from snapc.quality import (
    FeatureClassifier,
    cell_targets,
    frechet_distance,
    generate,
    image_features,
    prompt_adherence,
    validation_codes,
)
from snapc.shapes.data import N_OBJECTS, render, sample_codes
from snapc.shapes.model import build_unet
from snapc.shapes.schedule import TRAIN_STEPS, add_noise
from snapc.shapes.text import TextEncoder, caption_tokens


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("out/shapes"))
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1_000_000, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=7.5, help="or after this much training")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-drop", type=float, default=0.1)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--two-object-fraction", type=float, default=None,
                   help="draw this share of each batch from two-object scenes (default: the "
                        "pool's own ~half); more of them trains colour binding harder")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--anneal", action="store_true", help="cosine learning rate to 0 by --minutes")
    p.add_argument("--eval-prompts", type=int, default=1000)
    p.add_argument("--eval-guidance", type=float, nargs="*", default=[2.0, 3.0, 5.0])
    args = p.parse_args()
    if args.two_object_fraction is not None and not 0.0 <= args.two_object_fraction <= 1.0:
        p.error("--two-object-fraction must be within [0, 1]")
    return args


def _train_pool(n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return sample_codes(n, split="train", generator=gen, device=device)


def _batch_sampler(pool: torch.Tensor, two_fraction: float | None
                   ) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Return ``draw(batch, gen)``: scene codes from ``pool``, ``two_fraction`` of them
    two-object scenes (None: uniformly from the pool). The pool is split once, here."""
    device = pool.device

    def uniform(batch: int, gen: torch.Generator) -> torch.Tensor:
        return pool[torch.randint(len(pool), (batch,), generator=gen, device=device)]

    if two_fraction is None:
        return uniform
    two, one = pool[pool >= N_OBJECTS], pool[pool < N_OBJECTS]

    def weighted(batch: int, gen: torch.Generator) -> torch.Tensor:
        pick_two = torch.rand(batch, generator=gen, device=device) < two_fraction
        return torch.where(
            pick_two, two[torch.randint(len(two), (batch,), generator=gen, device=device)],
            one[torch.randint(len(one), (batch,), generator=gen, device=device)])

    return weighted


def train_classifier(pool: torch.Tensor, steps: int, seed: int) -> FeatureClassifier:
    """Return the feature classifier trained on noisy renders of training scenes."""
    device = pool.device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    model = FeatureClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        codes = pool[torch.randint(len(pool), (512,), generator=gen, device=device)]
        x = render(codes)
        sigma = torch.rand(len(x), 1, 1, 1, generator=gen, device=device) * 0.3
        x = x + sigma * torch.randn(x.shape, generator=gen, device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), cell_targets(codes).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"classifier step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    val = validation_codes(2000).to(device)
    with torch.no_grad():
        acc = (model(render(val)).argmax(-1) == cell_targets(val)).float().mean()
    print(f"classifier val cell accuracy {acc.item():.4f}", flush=True)
    return model


def _half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous().cpu() for k, v in module.state_dict().items()}


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    pool = _train_pool(2_000_000, args.seed, device)

    if args.resume:
        classifier = FeatureClassifier()
        saved = load_file(str(args.resume / "classifier.safetensors"))
        classifier.load_state_dict({k: v.float() for k, v in saved.items()})
        classifier = classifier.to(device).eval()
        shutil.copy(args.resume / "classifier.safetensors", args.out / "classifier.safetensors")
    else:
        classifier = train_classifier(pool, args.classifier_steps, args.seed)
        save_file(_half_state(classifier), str(args.out / "classifier.safetensors"))

    unet, text = build_unet().to(device), TextEncoder().to(device)
    start_step, history = 0, []
    if args.resume:
        unet.load_state_dict({k: v.float() for k, v in
                              load_file(str(args.resume / "unet.safetensors")).items()})
        text.load_state_dict({k: v.float() for k, v in
                              load_file(str(args.resume / "text_encoder.safetensors")).items()})
        previous = json.loads((args.resume / "training.json").read_text())
        start_step, history = previous["steps"], previous["runs"]
    params = [*unet.parameters(), *text.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    forward = torch.compile(unet) if args.compile else unet
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 + start_step)
    print(f"unet params {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, "
          f"text {sum(p.numel() for p in text.parameters()) / 1e6:.2f} M", flush=True)

    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    step, losses, window = 0, [], torch.zeros((), device=device)
    draw = _batch_sampler(pool, args.two_object_fraction)
    while step < args.steps and time.time() < deadline:
        codes = draw(args.batch, gen)
        x0 = render(codes)
        tokens = caption_tokens(codes)
        drop = torch.rand(args.batch, generator=gen, device=device) < args.caption_drop
        tokens = torch.where(drop.unsqueeze(1), torch.zeros_like(tokens), tokens)
        t = torch.randint(0, TRAIN_STEPS, (args.batch,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        xt = add_noise(x0, noise, t)
        scale = min(1.0, (step + 1) / args.warmup)
        if args.anneal:  # cosine to zero over the time budget
            scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / (deadline - t0))))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            context = text(tokens)
            try:
                pred = forward(xt, t.float(), context, return_dict=False)[0]
            except Exception as err:  # torch.compile fails, if at all, on the first call
                if forward is unet or step > 0:
                    raise
                print(f"torch.compile failed ({type(err).__name__}); training eager", flush=True)
                forward = unet
                pred = forward(xt, t.float(), context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        window += loss.detach()
        step += 1
        if step % 250 == 0:
            losses.append(window.item() / 250)
            window.zero_()
            print(f"step {start_step + step} loss {losses[-1]:.4f} "
                  f"{step / (time.time() - t0):.1f} it/s", flush=True)
    train_s = time.time() - t0

    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    save_file(_half_state(unet), str(args.out / "unet.safetensors"))
    save_file(_half_state(text), str(args.out / "text_encoder.safetensors"))

    # Evaluate the exported fp16 weights (rounded back to fp32), as they ship.
    for module in (unet, text):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(p.half().float())
    unet.eval()
    text.eval()
    codes = validation_codes(args.eval_prompts)
    real = image_features(classifier, render(codes))
    sweep = {}
    for g in args.eval_guidance:
        images = generate(unet, text, codes, guidance=g, device=device, batch=1000)
        scores = prompt_adherence(images, codes)
        scores["fd"] = frechet_distance(image_features(classifier, images), real)
        sweep[str(g)] = scores
        print(f"guidance {g}: {json.dumps(scores)}", flush=True)

    final_loss = sum(losses[-4:]) / max(len(losses[-4:]), 1)
    run = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seed": args.seed,
        "start_step": start_step,
        "steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "anneal": args.anneal,
        "ema": args.ema,
        "train_seconds": round(train_s, 1),
        "final_loss": round(final_loss, 5),
        "loss_every_250": [round(v, 5) for v in losses],
        "eval_25_steps": sweep,
    }
    summary = {"steps": start_step + step, "final_loss": run["final_loss"], "runs": [*history, run]}
    (args.out / "training.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {start_step + step} steps, final loss {final_loss:.5f}", flush=True)


if __name__ == "__main__":
    main()
