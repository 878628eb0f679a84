"""shapes-latent's training recipe: the autoencoder phase, then the latent UNet phase.

Each phase is one run of snapc.train.loop's ``train`` (progress callback, atomic checkpoints
in ``<out>.checkpoints/<phase>``, ``resume``, NaN stop, seeds, torchrun DDP) followed by its
check on validation scenes, and writes its files into ``out`` (fp16, each atomically):

- ``vae``: ``vae/`` (diffusers AutoencoderKL folder; ``scaling_factor`` set to 1 / std of the
  trained encoder's latents) and the check "reconstructions decode to the right scene";
- ``unet``: ``unet/`` (diffusers UNet2DConditionModel folder) and ``text_encoder.safetensors``,
  and the check "prompt adherence of the whole pipeline at 25 DDIM steps, CFG 3".

``training.json`` keeps every phase's record (command, options, loss curve, device, checks,
sizes) and ``TRAINING.md`` is re-rendered from it after each phase, so it states only what was
measured.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from snapc.artifacts import atomic_output_dir, atomic_output_file
from snapc.errors import SnapcError
from snapc.shapes.data import sample_codes
from snapc.shapes.text import TextEncoder
from snapc.shapes_latent.config import UNET_CONFIG, VAE_CONFIG, build_vae, scenes
from snapc.shapes_latent.methods import AutoencoderTraining, LatentDiffusion
from snapc.train.distributed import World, setup_world, teardown_world
from snapc.train.loop import train
from snapc.train.options import TrainOptions

__all__ = ["PhaseOptions", "train_autoencoder", "train_latent_unet", "render_training_md",
           "SIZE_LIMIT_MB"]

SIZE_LIMIT_MB = 30.0


@dataclass(frozen=True)
class PhaseOptions:
    """Where a phase writes and what it checks on: output folder, validation size, configs."""

    out: Path
    eval_prompts: int = 1000
    eval_steps: int = 25  # DDIM steps of the adherence check (with CFG 3)
    kl_weight: float = 1e-6  # per latent element vs per-pixel MSE; SD 1.x: ~1e-7 here
    caption_dropout: float = 0.1
    scale_samples: int = 1024  # training scenes whose latent std sets scaling_factor
    resume: bool = False
    init_from: Path | None = None  # unet phase: start from the UNet + text encoder of a folder
    # the unet phase wrote (snapc.shapes_latent.pipeline.load_pipeline reads it)
    vae_config: dict | None = None  # None: VAE_CONFIG (tests pass a smaller one)
    unet_config: dict | None = None  # None: UNET_CONFIG

    def check(self) -> None:
        """Raise SnapcError for a bad validation size or loss weight."""
        if self.scale_samples < 2:
            raise SnapcError(f"scale_samples must be >= 2, not {self.scale_samples}")
        if self.eval_steps < 1:
            raise SnapcError(f"--eval-steps must be >= 1, not {self.eval_steps}")
        if self.eval_prompts < 1:
            raise SnapcError(f"--eval-prompts must be >= 1, not {self.eval_prompts}")
        if self.kl_weight < 0:
            raise SnapcError(f"--kl-weight must be >= 0, not {self.kl_weight}")
        if not 0 <= self.caption_dropout < 1:
            raise SnapcError(f"--caption-dropout must be in [0, 1), not {self.caption_dropout}")
        if self.init_from is not None:
            for part in ("vae/config.json", "unet/config.json", "text_encoder.safetensors"):
                if not (self.init_from / part).is_file():
                    raise SnapcError(f"--init-from: {self.init_from / part} missing; point at "
                                     "a folder the unet phase wrote")


def _checkpoints(out: Path, phase: str) -> Path:
    return out.parent / f"{out.name}.checkpoints" / phase


def _record_path(out: Path) -> Path:
    return out / "training.json"


def _read_record(out: Path) -> dict[str, Any]:
    path = _record_path(out)
    return json.loads(path.read_text()) if path.is_file() else {"phases": {}}


def _size_mb(out: Path) -> float:
    files = [p for p in out.rglob("*") if p.suffix == ".safetensors"]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def _write_record(out: Path, phase: str, record: dict[str, Any]) -> dict[str, Any]:
    full = _read_record(out)
    full["phases"][phase] = record
    full["size_mb"] = _size_mb(out)
    full["size_limit_mb"] = SIZE_LIMIT_MB
    with atomic_output_file(_record_path(out)) as tmp:
        tmp.write_text(json.dumps(full, indent=1, default=str))
    with atomic_output_file(out / "TRAINING.md") as tmp:
        tmp.write_text(render_training_md(full))
    return full


def _run(method: Any, options: TrainOptions, out: Path, phase: str, world: World,
         resume: bool, progress: Callable | None) -> dict[str, Any]:
    from snapc.train.checkpoint import latest_checkpoint

    folder = _checkpoints(out, phase)
    result = train(method, options, folder, world=world,
                   resume=resume and latest_checkpoint(folder) is not None,
                   progress=None if progress is None else (lambda p: progress(phase, p)))
    return result.record


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).cpu().half()


def _as_shipped(half: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Return an fp32 copy of fp16 weights (``.float()`` alone would convert ``half`` itself)."""
    return copy.deepcopy(half).float().to(device).eval()


@torch.no_grad()
def _latent_std(vae: torch.nn.Module, device: torch.device, n: int = 1024) -> float:
    gen = torch.Generator(device=device).manual_seed(12345)
    codes = sample_codes(n, split="train", generator=gen, device=device)
    means = [vae.encode(scenes(codes[i:i + 256])).latent_dist.mean for i in range(0, n, 256)]
    return float(torch.cat(means).float().std())


def train_autoencoder(phase: PhaseOptions, options: TrainOptions, *,
                      progress: Callable | None = None) -> dict[str, Any]:
    """Train the autoencoder, set its scaling factor, check reconstructions, write ``vae/``.

    Returns the phase record (training record + checks). Raises SnapcError for bad options.
    """
    from snapc.quality import validation_codes
    from snapc.shapes_latent.pipeline import reconstruction_accuracy

    phase.check()
    options.check()
    world = setup_world(options.device)
    try:
        torch.manual_seed(options.seed)
        method = AutoencoderTraining(build_vae(phase.vae_config), options.batch, world.device,
                                     kl=phase.kl_weight, seed=options.seed)
        record = _run(method, options, phase.out, "vae", world, phase.resume, progress)
        if not world.main:
            return {}
        vae = method.student.vae.eval()
        std = _latent_std(vae, world.device, phase.scale_samples)
        vae.register_to_config(scaling_factor=1.0 / std)
        half = _half_copy(vae)  # check what ships: the fp16 weights, computed in fp32
        shipped = _as_shipped(half, world.device)
        accuracy = reconstruction_accuracy(shipped, validation_codes(phase.eval_prompts))
        phase.out.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(phase.out / "vae", force=True) as tmp:
            half.save_pretrained(tmp, safe_serialization=True)
        record |= {"command": " ".join(["python", *sys.argv]),
                   "params": sum(p.numel() for p in vae.parameters()),
                   "scaling_factor": vae.config.scaling_factor,
                   "checks": {"reconstruction_scene_accuracy": accuracy,
                              "validation_images": phase.eval_prompts}}
        _write_record(phase.out, "vae", record)
        shutil.rmtree(_checkpoints(phase.out, "vae"), ignore_errors=True)
        return record
    finally:
        teardown_world(world)


def _unet_start(phase: PhaseOptions) -> tuple[torch.nn.Module, TextEncoder, dict | None]:
    """Return the UNet and text encoder the unet phase starts from, fp32: new ones, or with
    ``init_from`` that folder's (a warm restart: new optimiser and lr schedule, for training
    in several runs where one run is time-limited), with the record of how they were made."""
    from diffusers import UNet2DConditionModel

    from snapc.shapes_latent.pipeline import load_pipeline

    if phase.init_from is None:
        return UNet2DConditionModel(**(phase.unet_config or UNET_CONFIG)), TextEncoder(), None
    _, unet, text = load_pipeline(phase.init_from)
    before = _read_record(phase.init_from)["phases"].get("unet", {})
    chain = before.get("init_from", {}).get("chain", [])
    step = {k: before.get(k) for k in ("command", "steps", "train_seconds", "checks")}
    return unet, text, {"path": str(phase.init_from), "chain": [*chain, step],
                        "steps_before": sum(int(c.get("steps") or 0) for c in [*chain, step])}


def train_latent_unet(phase: PhaseOptions, options: TrainOptions, *,
                      progress: Callable | None = None) -> dict[str, Any]:
    """Train the latent UNet and text encoder on ``out/vae``'s latents, check the pipeline's
    prompt adherence (``eval_steps`` DDIM steps, 25 by default, CFG 3), write ``unet/`` and
    ``text_encoder.safetensors``.

    Raises SnapcError when ``out/vae`` is missing (train the autoencoder first).
    """
    from diffusers import AutoencoderKL

    phase.check()
    options.check()
    if not (phase.out / "vae" / "config.json").is_file():
        raise SnapcError(f"{phase.out / 'vae'} missing; run the vae phase first "
                         "(`python bench/train_shapes_latent.py vae --minutes M`)")
    world = setup_world(options.device)
    try:
        torch.manual_seed(options.seed)
        vae = AutoencoderKL.from_pretrained(phase.out / "vae", low_cpu_mem_usage=False).float()
        unet, text, earlier = _unet_start(phase)
        method = LatentDiffusion(unet, text, vae, options.batch, world.device,
                                 caption_dropout=phase.caption_dropout, seed=options.seed)
        record = _run(method, options, phase.out, "unet", world, phase.resume, progress)
        if not world.main:
            return {}
        half_unet, half_text = _half_copy(method.student.unet), _half_copy(method.student.text)
        checks = pipeline_checks(vae.to(world.device).eval(),
                                 _as_shipped(half_unet, world.device),
                                 _as_shipped(half_text, world.device),
                                 phase.eval_prompts, phase.eval_steps, world.device)
        with atomic_output_dir(phase.out / "unet", force=True) as tmp:
            half_unet.save_pretrained(tmp, safe_serialization=True)
        with atomic_output_file(phase.out / "text_encoder.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in half_text.state_dict().items()}, str(tmp))
        record |= {"command": " ".join(["python", *sys.argv]),
                   "params": {"unet": sum(p.numel() for p in half_unet.parameters()),
                              "text_encoder": sum(p.numel() for p in half_text.parameters())},
                   "checks": checks}
        if earlier is not None:
            record["init_from"] = earlier
        _write_record(phase.out, "unet", record)
        shutil.rmtree(_checkpoints(phase.out, "unet"), ignore_errors=True)
        return record
    finally:
        teardown_world(world)


def pipeline_checks(vae: torch.nn.Module, unet: torch.nn.Module, text: torch.nn.Module,
                    prompts: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Return the unet phase's check: prompt adherence of the whole pipeline (DDIM, CFG 3,
    x0 clipped to the encoder's latent range) on ``prompts`` validation captions."""
    from snapc.quality import prompt_adherence, validation_codes
    from snapc.shapes.data import caption
    from snapc.shapes_latent.config import to_shapes_resolution
    from snapc.shapes_latent.pipeline import generate, latent_range

    codes = validation_codes(prompts)
    _, images = generate(vae, unet, text, [caption(int(c)) for c in codes], steps=steps,
                         device=device)
    return {"sampler": {"steps": steps, "guidance": 3.0, "spacing": "linspace",
                        "x0_range": round(latent_range(vae), 4)},
            "validation_prompts": prompts,
            **prompt_adherence(to_shapes_resolution(images), codes)}


def recheck_pipeline(out: Path, prompts: int, steps: int, device: str = "cpu") -> dict[str, Any]:
    """Re-measure the unet phase's check on the files in ``out`` (as shipped, fp16 read as
    fp32) with today's sampler on ``device`` (as ``--train-device``: auto, cpu, cuda); replace
    it in training.json (the old one kept under ``checks_before``) and TRAINING.md. Returns
    the new check."""
    from snapc.shapes_latent.pipeline import load_pipeline

    record = _read_record(out)["phases"].get("unet")
    if record is None:  # before the long part
        raise SnapcError(f"{_record_path(out)} has no unet phase to re-check; train it with "
                         "`python bench/train_shapes_latent.py unet --out DIR`")
    world = setup_world(device)
    try:
        vae, unet, text = (m.to(world.device) for m in load_pipeline(out))
        checks = pipeline_checks(vae, unet, text, prompts, steps, world.device)
    finally:
        teardown_world(world)
    record["checks_before"] = record.get("checks")
    record["checks"] = checks
    record["rechecked_by"] = " ".join(["python", *sys.argv])
    _write_record(out, "unet", record)
    return checks


def render_training_md(full: dict[str, Any]) -> str:
    """Return TRAINING.md for a training.json: files, per-phase command, steps, time, final
    loss and measured checks (nothing that was not measured)."""
    lines = ["# shapes-latent: how these weights were made", "",
             "Written by `snapc.shapes_latent.recipe` from `training.json` after each phase.", "",
             "Files (fp16 safetensors, EMA weights): `vae/` (diffusers AutoencoderKL, "
             f"`{len(VAE_CONFIG['block_out_channels'])}` resolutions, mid-block attention), "
             "`unet/` (diffusers UNet2DConditionModel, shapes' SD layout on 16x16x4 latents), "
             "`text_encoder.safetensors` (`snapc.shapes.text.TextEncoder`).",
             f"Total size: {full.get('size_mb')} MB (limit {SIZE_LIMIT_MB:g} MB).", ""]
    for name, rec in full["phases"].items():
        opts = rec.get("options", {})
        checks = {k: (round(v, 4) if isinstance(v, float) else v)
                  for k, v in rec.get("checks", {}).items()}
        devices = sorted({r.get("device", "?") for r in rec.get("runs", [])})
        lines += [f"## phase `{name}`", "", "```", rec.get("command", "?"), "```", "",
                  f"- steps {rec.get('steps')}, training {rec.get('train_seconds')} s on "
                  f"{', '.join(devices)} ({rec.get('world_size', 1)} process(es)), batch "
                  f"{opts.get('batch')}, lr {opts.get('lr')}, EMA {opts.get('ema')}, "
                  f"seed {opts.get('seed')}",
                  f"- final loss {rec.get('final_loss')}", f"- checks: {json.dumps(checks)}"]
        if "init_from" in rec:
            lines.append(f"- started from earlier weights ({rec['init_from']['steps_before']} "
                         f"steps in {len(rec['init_from']['chain'])} earlier run(s), commands "
                         "in training.json's init_from)")
        lines.append("")
    return "\n".join(lines)
