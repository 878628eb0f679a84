"""Train shapes-latent (GPU): the autoencoder, then the latent UNet + text encoder.

    python bench/train_shapes_latent.py vae --minutes 10 --train-device cuda
    python bench/train_shapes_latent.py unet --minutes 20 --train-device cuda
    python bench/train_shapes_latent.py all --minutes 15 --train-device cuda   # both phases
    python bench/train_shapes_latent.py check --out DIR   # re-measure the shipped files' check

Each phase is a run of snapc.train.loop's ``train`` (progress bar with loss and time left,
atomic checkpoints in ``<out>.checkpoints/<phase>``, ``--resume``, NaN stop, torchrun DDP:
``torchrun --standalone --nproc_per_node 8 bench/train_shapes_latent.py unet ...``) and writes
its fp16 files, training.json and TRAINING.md into --out (default snapc/weights/shapes-latent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from snapc.cli_common import err
from snapc.cli_training import TrainBar
from snapc.errors import SnapcError
from snapc.shapes_latent.config import WEIGHTS_DIR
from snapc.shapes_latent.recipe import (
    PhaseOptions,
    recheck_pipeline,
    train_autoencoder,
    train_latent_unet,
)
from snapc.train.options import TrainOptions

DEFAULTS = {"vae": {"batch": 128, "lr": 5e-4}, "unet": {"batch": 512, "lr": 3e-4}}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["vae", "unet", "all", "check"])
    p.add_argument("--minutes", type=float, default=None, help="training minutes per phase")
    p.add_argument("--steps", type=int, default=None, help="training steps per phase")
    p.add_argument("--batch", type=int, default=None, help="global batch (vae 128, unet 512)")
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (vae 5e-4, unet 3e-4)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--lr-decay", choices=["cosine", "constant"], default="cosine",
                   help="cosine: anneal to 0 by the run's end (a constant lr let a late loss "
                        "spike at step ~3800 reach the EMA weights of a 2.6-minute vae run)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="KL per latent element against MSE per pixel (SD 1.x: ~1e-7)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--eval-prompts", type=int, default=1000)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--train-device", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="unet phase: start from this folder's unet/ and text encoder (train "
                        "in several time-limited runs: --init-from the last run's --out)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    return p.parse_args()


def main() -> None:
    """Run the chosen phase(s) and print each phase's record summary."""
    args = _parse()
    phase = PhaseOptions(out=args.out, eval_prompts=args.eval_prompts,
                         eval_steps=args.eval_steps, kl_weight=args.kl_weight,
                         caption_dropout=args.caption_dropout, resume=args.resume,
                         init_from=args.init_from)
    phases = ["vae", "unet"] if args.phase == "all" else [args.phase]
    runners = {"vae": train_autoencoder, "unet": train_latent_unet}
    try:
        if args.phase == "check":
            checks = recheck_pipeline(args.out, args.eval_prompts, args.eval_steps,
                                      args.train_device)
            err.print(f"{args.out}: {json.dumps(checks)}")
            return
        with TrainBar() as bar:
            for name in phases:
                options = TrainOptions(
                    steps=args.steps, minutes=args.minutes,
                    batch=args.batch or DEFAULTS[name]["batch"],
                    lr=args.lr or DEFAULTS[name]["lr"], warmup=args.warmup,
                    lr_decay=args.lr_decay, ema=args.ema,
                    seed=args.seed, device=args.train_device,
                    checkpoint_every=args.checkpoint_every)
                record = runners[name](phase, options, progress=bar.update)
                if record:
                    bar.stage(f"{name}: {record['steps']} steps, final loss "
                              f"{record['final_loss']:.5f}, checks "
                              f"{json.dumps(record['checks'])}")
    except SnapcError as exc:  # the CLI contract: one error line, exit 2
        err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(exc.exit_code)
    err.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
