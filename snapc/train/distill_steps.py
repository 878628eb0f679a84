"""``snapc distill --sampling-steps N``: progressive, guided step distillation, round by round.

1. Everything a user can get wrong is checked from names and records alone, before any weights
   load (:meth:`StepOptions.check` returns the resolved :class:`StepPlan`): the model must be
   of a trained family, ``shapes`` or ``shapes-latent`` (the training data and the empty
   caption CFG needs come with it; data-free step distillation is not supported yet), the
   steps and start steps must plan whole halving rounds, and a model that already has guidance
   built in is its own teacher at its stored steps and guidance.
2. Each round (:class:`snapc.train.steps.StepDistillation`) is one ``train(...)`` call with
   its own checkpoint folder ``<out>.checkpoints/round-K-AtoB/``. A finished round leaves
   its student's EMA weights and record beside them (``round-K-AtoB.safetensors`` and
   ``.json``); ``--resume`` skips finished rounds, continues the interrupted one from its
   last checkpoint and starts the rest. ``plan.json`` there names the model, its weights
   and the rounds, so resuming with another model or other steps is a one-line error.
3. The last student is written as a pruned-UNet folder (snapc.pruned) with the same removed
   blocks as the model it came from (none for ``shapes``), whose record stores the sampler
   ``SamplerSpec(steps=N, guidance=w, spacing="trailing", guidance_embedded=True)`` (for
   shapes-latent also ``alpha_floor``: the loss's floor, see :mod:`snapc.train.steps`), with
   ``training.json`` (every round's record) beside it; ``keep_rounds`` also writes each
   intermediate student as ``rounds/<steps>-steps/``. The checkpoints are deleted once the
   folder is in place.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.artifacts import atomic_output_dir, atomic_output_file, check_output_dir
from snapc.errors import SnapcError, UnknownNameError
from snapc.shapes.sampler import SamplerSpec
from snapc.train.checkpoint import CheckpointError, latest_checkpoint
from snapc.train.distill import Progress, checkpoint_folder
from snapc.train.distributed import setup_world, teardown_world
from snapc.train.loop import train
from snapc.train.options import TrainOptions
from snapc.train.steps import Round, StepDistillation, StepLoss, plan_rounds

__all__ = ["StepOptions", "StepPlan", "SourceModel", "describe_source", "distill_steps"]

PLAN_FILE = "plan.json"
DEFAULT_START_STEPS = 32
DEFAULT_GUIDANCE = 3.0  # the shapes evaluation protocol's CFG scale


@dataclass(frozen=True)
class SourceModel:
    """What a model's name and records say, read without loading weights."""

    model: str
    base: str
    removed: tuple[str, ...]
    sampler: SamplerSpec | None  # the stored sampler, None when the record has none


def describe_source(model: str) -> SourceModel:
    """Return MODEL's base, removed blocks and stored sampler from its name or record.

    Raises SnapcError (one line) for a model step distillation cannot take: another family
    than shapes or shapes-latent, an unknown name, a corrupt record.
    """
    from snapc.families import is_trained_family
    from snapc.models import MODELS
    from snapc.pruned import RECORD_FILE, is_pruned_folder, read_record

    shipped = Path(__file__).resolve().parent.parent / "weights" / model
    path = Path(model)
    if model in MODELS:
        folder = shipped if is_pruned_folder(shipped) else None
        base = model if folder is None else None
    elif path.is_dir() and is_pruned_folder(path):
        folder, base, model = path, None, str(path.resolve())  # one spelling per folder
    elif path.exists():
        raise _not_supported(model, "a model without a shapes or shapes-latent record")
    else:
        raise UnknownNameError("model", model, list(MODELS) + ["<pruned-UNet folder>"])
    if folder is None:
        record_base, removed, sampler = base, (), None
    else:
        record = read_record(folder)
        record_base, removed = record.base, record.removed
        try:
            sampler = None if record.sampler is None else SamplerSpec.from_json(record.sampler)
        except (TypeError, ValueError) as exc:
            raise SnapcError(f"bad sampler record in {folder / RECORD_FILE}: {exc}") from exc
    if not is_trained_family(record_base):
        raise _not_supported(model, f"a '{record_base}' model")
    return SourceModel(model, record_base, tuple(removed), sampler)


def _not_supported(model: str, what: str) -> SnapcError:
    return SnapcError(f"step distillation trains on the shapes families' scenes and empty "
                      f"caption (shapes, shapes-latent); {model} is {what}, and data-free "
                      "step distillation (from a teacher's own samples) is not supported yet")


@dataclass(frozen=True)
class StepPlan:
    """The resolved run: the source, the guidance, the rounds, whether round 1 uses CFG,
    and the alpha floor the students are sampled with (and the source's, as round 1's
    teacher)."""

    source: SourceModel
    guidance: float
    start_steps: int
    steps: int
    rounds: tuple[Round, ...]
    teacher_cfg: bool
    alpha_floor: float = 0.0
    source_floor: float = 0.0

    @property
    def latent(self) -> bool:
        """Return whether the source is of the shapes-latent family."""
        from snapc.families import is_latent_family

        return is_latent_family(self.source.base)

    def sampler(self, steps: int | None = None) -> SamplerSpec:
        """Return the sampler a distilled student (of ``steps``, default the last) is stored
        with."""
        return SamplerSpec(steps=steps or self.steps, guidance=self.guidance,
                           spacing="trailing", guidance_embedded=True,
                           alpha_floor=self.alpha_floor)

    def teacher_floor(self, round_index: int) -> float:
        """Return the alpha floor round ``round_index``'s teacher samples with."""
        return self.source_floor if round_index == 1 else self.alpha_floor

    def to_json(self) -> dict[str, Any]:
        """Return what ``plan.json`` holds (compared on resume)."""
        return {"model": self.source.model, "base": self.source.base,
                "removed_blocks": list(self.source.removed), "guidance": self.guidance,
                "start_steps": self.start_steps, "sampling_steps": self.steps,
                "teacher_cfg": self.teacher_cfg, "alpha_floor": self.alpha_floor,
                "rounds": [r.key for r in self.rounds]}


@dataclass(frozen=True)
class StepOptions:
    """What to distil to how many steps, with which guidance, and where the result goes.

    ``guidance`` None: the model's stored guidance, else 3 (the shapes protocol).
    ``start_steps`` None: the stored steps of a model with guidance built in, else 32.
    """

    model: str
    out: Path
    sampling_steps: int
    guidance: float | None = None
    start_steps: int | None = None
    name: str | None = None
    keep_rounds: bool = False
    force: bool = False
    resume: bool = False
    loss: StepLoss = field(default_factory=StepLoss)

    def check(self) -> StepPlan:
        """Return the plan, or raise SnapcError (one line) before anything is loaded."""
        if isinstance(self.sampling_steps, bool) or self.sampling_steps < 1:
            raise SnapcError(f"--sampling-steps must be >= 1, not {self.sampling_steps}")
        if self.start_steps is not None and self.start_steps < 2:
            raise SnapcError(f"--start-steps must be >= 2, not {self.start_steps}")
        if self.guidance is not None and not (math.isfinite(self.guidance)
                                              and self.guidance >= 1.0):
            raise SnapcError(f"--guidance must be >= 1 (1: the conditional model alone), "
                             f"not {self.guidance}")
        self.loss.check()
        source = describe_source(self.model)
        stored = source.sampler
        embedded = stored is not None and stored.guidance_embedded
        if embedded:
            if self.guidance is not None and self.guidance != stored.guidance:
                raise SnapcError(f"{self.model} has guidance {stored.guidance:g} built in (no "
                                 "unconditional branch is left to guide with); drop --guidance "
                                 f"{self.guidance:g}, or distil its base model")
            if stored.spacing != "trailing":
                raise SnapcError(f"{self.model} has guidance built in but samples with "
                                 f"{stored.spacing} timesteps; step distillation continues "
                                 "trailing-grid students only")
            if self.start_steps not in (None, stored.steps):
                raise SnapcError(f"teacher/student mismatch: {self.model} samples in "
                                 f"{stored.steps} steps (its stored sampler), so the teacher "
                                 f"starts there; drop --start-steps {self.start_steps}")
            start = stored.steps
            guidance = stored.guidance
        else:
            start = self.start_steps or DEFAULT_START_STEPS
            guidance = DEFAULT_GUIDANCE if self.guidance is None else float(self.guidance)
            if self.guidance is None and stored is not None:
                guidance = stored.guidance
        if self.sampling_steps >= start:
            raise SnapcError(f"--sampling-steps {self.sampling_steps} must be fewer than the "
                             f"teacher's {start} steps (--start-steps)")
        try:
            rounds = plan_rounds(start, self.sampling_steps)
        except ValueError as exc:
            raise SnapcError(f"--start-steps: {exc}") from exc
        if not self.resume:
            check_output_dir(self.out, self.force)
        from snapc.families import is_latent_family

        # pixels: the sampler takes x0's sign at t = 999 (module notes of snapc.train.steps);
        # latents are not at their clip bound, so the students are sampled with the floor
        floor = self.loss.alpha_floor if is_latent_family(source.base) else 0.0
        plan = StepPlan(source, guidance, start, self.sampling_steps, tuple(rounds),
                        teacher_cfg=not embedded and guidance != 1.0, alpha_floor=floor,
                        source_floor=stored.alpha_floor if embedded else 0.0)
        _check_checkpoints(checkpoint_folder(self.out), plan, self.resume)
        return plan


def _check_checkpoints(folder: Path, plan: StepPlan, resume: bool) -> None:
    """Raise SnapcError when ``folder`` holds another run, or nothing to resume."""
    stored = folder / PLAN_FILE
    busy = folder.exists() and any(folder.iterdir())
    if not resume:
        if busy:
            raise SnapcError(f"{folder} holds checkpoints of an earlier run; pass --resume to "
                             "continue it, or delete the folder to start again")
        return
    if not stored.is_file():
        raise CheckpointError(f"no step-distillation run in {folder} to resume from; start "
                              "without --resume")
    try:
        saved = json.loads(stored.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt {stored} ({exc}); delete {folder} and start "
                              "again") from exc
    mine = plan.to_json()
    diff = [k for k in mine if saved.get(k) != mine[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(f"teacher/student mismatch: {folder} continues {saved.get('model')}"
                              f" with {k}={saved.get(k)!r}, this run asks {mine[k]!r}; resume "
                              "with the same model and steps, or delete the folder")


def _load_teacher(source: SourceModel, device: torch.device) -> tuple[nn.Module, Any]:
    """Return the model as a diffusers UNet with its removed blocks as skips, and its info."""
    from snapc.models import load_model
    from snapc.pruned import skip_blocks

    loaded = load_model(source.model)
    module = loaded.module
    if loaded.removed:
        module = skip_blocks(module, loaded.removed, in_place=True)
    return module.to(device).eval().requires_grad_(False), loaded


def _save_state(path: Path, module: nn.Module) -> None:
    from safetensors.torch import save_file

    with atomic_output_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(tmp))


def _load_state(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types on damaged files
        raise CheckpointError(f"corrupt round weights {path} ({str(exc)[:100]}); delete it to "
                              "train that round again") from exc
    module.load_state_dict(state)
    return module


def distill_steps(
    options: StepOptions,
    train_options: TrainOptions,
    *,
    progress: Progress | None = None,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run every round and write the student folder; return the training record.

    ``train_options`` apply to each round (``steps`` / ``minutes`` per round). Under
    ``torchrun`` every rank trains its slice of each batch and rank 0 writes the files.
    """
    import copy

    from snapc.shapes.model import encode_captions
    from snapc.shapes_latent.family import x0_bound
    from snapc.train.scenes import family_scenes

    plan = options.check()
    train_options.check()
    world = setup_world(train_options.device)
    try:
        started = time.perf_counter()
        folder = checkpoint_folder(options.out)
        report(f"loading {options.model}")
        teacher, loaded = _load_teacher(plan.source, world.device)
        identity = {"model": plan.source.model, "weights_sha256": loaded.info.weights_sha256,
                    "removed_blocks": list(plan.source.removed)}
        if world.main:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / PLAN_FILE).is_file():
                with atomic_output_file(folder / PLAN_FILE) as tmp:
                    tmp.write_text(json.dumps({**plan.to_json(), **identity}, indent=1))
        world.barrier()
        saved = json.loads((folder / PLAN_FILE).read_text())
        if saved.get("weights_sha256") != identity["weights_sha256"]:
            raise CheckpointError(f"teacher/student mismatch: {folder} was started from other "
                                  f"weights of {options.model}; resume with those, or delete "
                                  "the folder to start again")
        data = family_scenes(plan.source.base, train_options.batch, train_options.seed,
                             world.device, options.loss.caption_dropout)
        bound = x0_bound() if plan.latent else 1.0  # the sampler's x0 clip
        uncond = encode_captions([""], data.text) if plan.teacher_cfg else None
        records = []
        for r in plan.rounds:
            weights, record_file = folder / f"{r.key}.safetensors", folder / f"{r.key}.json"
            if weights.is_file() and record_file.is_file():
                report(f"{r.key}: finished earlier, loading its student")
                teacher = _load_state(copy.deepcopy(teacher), weights).eval()
                records.append(json.loads(record_file.read_text()))
                continue
            report(f"{r.key}: {r.teacher_steps} -> {r.student_steps} steps")
            method = StepDistillation(teacher, data, student_steps=r.student_steps,
                                      guidance=plan.guidance,
                                      uncond=uncond if r.index == 1 else None,
                                      loss=options.loss, stream=r.index,
                                      identity={**identity, "round": r.index},
                                      x0_bound=bound, teacher_floor=plan.teacher_floor(r.index))
            resume = options.resume and latest_checkpoint(folder / r.key) is not None
            result = train(method, train_options, folder / r.key, world=world, resume=resume,
                           progress=None if progress is None
                           else lambda p, key=r.key: progress(key, p))
            record = {**result.record, "round": r.index, "teacher_steps": r.teacher_steps,
                      "student_steps": r.student_steps}
            if world.main:
                _save_state(weights, result.student)
                with atomic_output_file(record_file) as tmp:
                    tmp.write_text(json.dumps(record, indent=1, default=str))
                shutil.rmtree(folder / r.key, ignore_errors=True)
            world.barrier()
            teacher = result.student.eval().requires_grad_(False)
            records.append(record)
        record = {"method": "step-distillation", "model": options.model,
                  "base": plan.source.base, "removed_blocks": list(plan.source.removed),
                  "random_weights": loaded.info.random_weights,
                  "sampler": plan.sampler().to_json(), "plan": plan.to_json(),
                  "rounds": records,
                  "steps": sum(r["steps"] for r in records),
                  "train_seconds": round(sum(r["train_seconds"] for r in records), 1),
                  "final_loss": records[-1]["final_loss"],
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        if world.main:
            _write_folder(options, plan, loaded, teacher, folder, record)
            shutil.rmtree(folder, ignore_errors=True)
        world.barrier()
        return record
    finally:
        teardown_world(world)


def _write_folder(options: StepOptions, plan: StepPlan, loaded: Any, student: nn.Module,
                  folder: Path, record: dict) -> None:
    import copy

    from snapc import pruned

    name = options.name or options.out.name
    config = dict(loaded.module.config)

    def write(where: Path, module: nn.Module, steps: int, label: str) -> None:
        sampler = plan.sampler(steps)
        pruned.save_pruned(
            where, module.cpu(), config,
            pruned.PrunedRecord(name=label, base=plan.source.base, removed=plan.source.removed,
                                random_weights=loaded.info.random_weights,
                                sampler=sampler.to_json(),
                                training="training.json"),
            dtype=torch.float32 if loaded.info.random_weights else torch.float16)

    with atomic_output_dir(options.out, force=options.force or options.resume) as tmp:
        write(tmp, student, plan.steps, name)
        (tmp / "training.json").write_text(json.dumps(record, indent=1, default=str))
        if options.keep_rounds:
            for r, rec in zip(plan.rounds[:-1], record["rounds"][:-1], strict=True):
                sub = tmp / "rounds" / f"{r.student_steps}-steps"
                sub.mkdir(parents=True)
                module = _load_state(copy.deepcopy(student), folder / f"{r.key}.safetensors")
                write(sub, module, r.student_steps, f"{name}@{r.student_steps}")
                (sub / "training.json").write_text(json.dumps(rec, indent=1, default=str))
