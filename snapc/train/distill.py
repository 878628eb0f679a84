"""``snapc distill``'s recovery flow: choose blocks, (robust-train,) recover, write a folder.

1. The removed set is named (``remove``) or chosen by block search for a latency budget on a
   device. With ``robust`` training the search scores candidates on the robust-trained model
   (SnapFusion's architecture evolution), else on the original.
2. Recovery distillation trains the pruned student from the teacher (snapc.train.recovery).
3. The EMA weights are written as a pruned-UNet folder (snapc.pruned) with ``training.json``
   beside them; checkpoints live in ``<out>.checkpoints/`` until the folder is in place.

Everything a user can get wrong is checked before the model is loaded.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.artifacts import atomic_output_dir, check_output_dir
from snapc.errors import SnapcError
from snapc.train.data import NoisedBatches
from snapc.train.distributed import World, setup_world, teardown_world
from snapc.train.loop import TrainProgress, train
from snapc.train.options import RecoveryLoss, TrainOptions

__all__ = ["RecoveryOptions", "RobustOptions", "distill_recovery", "checkpoint_folder"]

Progress = Callable[[str, TrainProgress], None]


@dataclass(frozen=True)
class RobustOptions:
    """Robust training before the search: how long, and which skip rates."""

    steps: int | None = None
    minutes: float | None = None
    drop_rates: tuple[float, ...] = (0.25, 0.5, 0.75)

    @property
    def enabled(self) -> bool:
        """Whether robust training runs at all."""
        return self.steps is not None or self.minutes is not None


@dataclass(frozen=True)
class RecoveryOptions:
    """What to prune and recover, and where the result goes."""

    model: str
    out: Path
    remove: tuple[str, ...] = ()
    device: str | None = None  # cost-model device of the block search
    budget: float | None = None  # fraction of the original latency on ``device``
    keep: tuple[str, ...] = ()
    name: str | None = None  # the recovered model's name (default: the folder name)
    conditioning: Path | None = None  # data-free: encoder_hidden_states (+ uncond)
    pool: int = 256  # data-free: teacher samples drawn once
    search_prompts: int = 100
    search_steps: int = 10
    force: bool = False
    resume: bool = False
    arch: str | None = None
    robust: RobustOptions = field(default_factory=RobustOptions)
    screen: int = 0  # random sets screened by a short recovery beside the search's pick
    screen_steps: int | None = None
    screen_minutes: float | None = None

    def check(self) -> None:
        """Raise SnapcError for option combinations that cannot work (before any loading)."""
        if bool(self.remove) == (self.budget is not None):
            raise SnapcError("name the blocks to remove with --remove, or give --device and "
                             "--budget for block search (one of the two)")
        if self.budget is not None:
            if self.device is None:
                raise SnapcError("--budget needs --device (the device whose latency it cuts)")
            if not 0.0 < self.budget < 1.0:
                raise SnapcError(f"--budget is a fraction of today's latency in (0, 1), "
                                 f"not {self.budget}")
            from snapc.cost import load_device

            load_device(self.device)
        if self.robust.enabled and self.budget is None:
            raise SnapcError("robust training serves the block search: use it with --device "
                             "and --budget, not with --remove")
        if self.screen:
            if self.budget is None:
                raise SnapcError("--screen compares removed sets for a budget: use it with "
                                 "--device and --budget")
            if self.screen < 0 or (self.screen_steps is None and self.screen_minutes is None):
                raise SnapcError("--screen N needs N >= 1 and a screening length: "
                                 "--screen-steps S or --screen-minutes M")
        if not self.resume:
            check_output_dir(self.out, self.force)
        if self.conditioning is not None and not self.conditioning.is_file():
            raise SnapcError(f"conditioning file not found: {self.conditioning}")


def _resuming(options: RecoveryOptions, folder: Path) -> bool:
    """Whether a phase resumes: asked to, and the phase had written a checkpoint."""
    from snapc.train.checkpoint import latest_checkpoint

    return options.resume and latest_checkpoint(folder) is not None


def checkpoint_folder(out: Path) -> Path:
    """Return the folder that holds a run's checkpoints while it trains."""
    return out.parent / f"{out.name}.checkpoints"


def _data_source(base: str, teacher: nn.Module, example: tuple[torch.Tensor, ...],
                 options: RecoveryOptions, train_options: TrainOptions, loss: RecoveryLoss,
                 random_weights: bool, device: torch.device):
    from snapc.families import is_trained_family
    from snapc.train.data import TeacherSamples, load_conditioning
    from snapc.train.scenes import family_scenes

    if is_trained_family(base):
        return family_scenes(base, train_options.batch, train_options.seed, device,
                             loss.caption_dropout)
    sample, _, context = example
    states, uncond = load_conditioning(options.conditioning, context.shape[-1], context.shape[1],
                                       random_ok=random_weights, seed=train_options.seed)
    return TeacherSamples(teacher.to(device), states, uncond, sample_shape=tuple(sample.shape[1:]),
                          base=base, batch_size=train_options.batch, seed=train_options.seed,
                          device=device, pool=options.pool, caption_dropout=loss.caption_dropout)


def _search(unet: nn.Module, loaded: Any, options: RecoveryOptions, device: torch.device,
            report: Callable[[str], None]) -> dict:
    """Return the block-search record for ``unet`` (the original or the robust model)."""
    from snapc.frontend import trace
    from snapc.passes import SearchBlocks
    from snapc.pipeline import PassContext
    from snapc.search_metrics import full_metric

    graph = trace(unet.cpu().eval(), loaded.example_inputs, loaded.info)
    metric = full_metric(graph, prompts=options.search_prompts, steps=options.search_steps,
                         device=str(device))
    search = SearchBlocks(device=options.device, budget=options.budget, keep=options.keep,
                          metric=metric, eval_device=str(device))
    result = search.run(graph, PassContext(options={"progress": report}))
    return result.info["search"]


def _robust_phase(loaded: Any, data: NoisedBatches, options: RecoveryOptions,
                  train_options: TrainOptions, loss: RecoveryLoss, world: World, folder: Path,
                  progress: Progress | None) -> nn.Module:
    """Robust-train the full model (or load it from a finished earlier phase)."""
    from safetensors.torch import load_file, save_file

    from snapc.train.recovery import RobustTraining

    done = folder / "robust_unet.safetensors"
    teacher = loaded.module
    if done.is_file():  # a resumed run: the robust phase finished before the kill
        robust = copy.deepcopy(teacher)
        robust.load_state_dict(load_file(str(done)))
        return robust
    method = RobustTraining(teacher, data, loss, keep=options.keep,
                            drop_rates=options.robust.drop_rates, seed=train_options.seed)
    robust_options = TrainOptions(**{**asdict(train_options), "steps": options.robust.steps,
                                     "minutes": options.robust.minutes})
    train(method, robust_options, folder / "robust", world=world,
          resume=_resuming(options, folder / "robust"),
          progress=None if progress is None else lambda p: progress("robust", p))
    robust = method.trained_unet()
    if world.main:
        save_file({k: v.contiguous().cpu() for k, v in robust.state_dict().items()}, str(done))
    world.barrier()
    return robust


def _screen(loaded: Any, data: NoisedBatches, options: RecoveryOptions,
            train_options: TrainOptions,
            loss: RecoveryLoss, world: World, folder: Path, chosen: list[str],
            start: nn.Module | None, progress: Progress | None) -> tuple:
    """Recover each candidate set briefly, score it; return the best set, its screened
    student (the start of the full recovery) and the screening table."""
    from snapc.frontend import trace
    from snapc.passes import SearchBlocks
    from snapc.pipeline import PassContext
    from snapc.train.recovery import RecoveryDistillation
    from snapc.train.screening import (
        Candidate,
        full_metric_score,
        heldout_loss_score,
        predicted_latency,
        random_sets,
    )

    teacher = loaded.module
    base = loaded.info.base or loaded.info.name
    graph = trace(teacher.cpu().eval(), loaded.example_inputs, loaded.info)
    cost = SearchBlocks(device=options.device).cost_model(PassContext())  # the search's own
    target = options.budget * cost.estimate_graph(graph).total_ms
    candidates = [Candidate("search", tuple(chosen), predicted_latency(graph, cost, chosen))]
    seeds = [train_options.seed * 1009 + i for i in range(options.screen)]
    candidates += random_sets(graph, cost, target, seeds, options.keep)
    score_fn = full_metric_score(base, options.search_prompts, options.search_steps)
    screen_options = TrainOptions(**{**asdict(train_options), "steps": options.screen_steps,
                                     "minutes": options.screen_minutes})
    table, students = [], []
    for i, candidate in enumerate(candidates):
        sub = folder / f"screen-{i}"
        method = RecoveryDistillation(teacher, candidate.removed, data, loss, start=start)
        done = sub / "screened.pt"
        if done.is_file():  # screened before a kill
            saved = torch.load(done, map_location="cpu", weights_only=False)
            method.student.load_state_dict(saved["student"])
            score, seconds = saved["score"], saved["seconds"]
        else:
            result = train(method, screen_options, sub, world=world,
                           resume=_resuming(options, sub),
                           progress=None if progress is None else
                           lambda p, i=i: progress(f"screen {i}", p))
            score = (score_fn or heldout_loss_score(
                method.loss, [method.batch(10**7 + k, world) for k in range(2)]))(
                    method.student, world.device)
            seconds = result.seconds
            if world.main:
                torch.save({"student": method.student.state_dict(), "score": score,
                            "seconds": seconds}, done)
            world.barrier()
        table.append({**candidate.to_json(), "score": score, "seconds": round(seconds, 1)})
        students.append(method.student)
    best = min(range(len(table)), key=lambda k: table[k]["score"])
    return list(candidates[best].removed), students[best], {
        "metric": "1 - adherence" if score_fn else "held-out distillation loss",
        "candidates": table, "chosen": candidates[best].origin}


def distill_recovery(
    options: RecoveryOptions,
    train_options: TrainOptions,
    loss: RecoveryLoss,
    *,
    progress: Progress | None = None,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the recovery flow and return the training record written beside the weights.

    Under ``torchrun`` every rank trains its slice of each batch and rank 0 writes the files.
    """
    from snapc import pruned
    from snapc.models import load_model

    options.check()
    train_options.check()
    loss.check()
    world = setup_world(train_options.device)
    try:
        started = time.perf_counter()
        folder = checkpoint_folder(options.out)
        if not options.resume and folder.exists() and any(folder.iterdir()):
            raise SnapcError(f"{folder} holds checkpoints of an earlier run; pass --resume to "
                             "continue it, or delete the folder to start again")
        report(f"loading {options.model}")
        loaded = load_model(options.model, arch=options.arch)
        if loaded.removed:
            raise SnapcError(f"{options.model} is already pruned; distill from its base model "
                             f"({loaded.info.base}) with --remove")
        base = loaded.info.base or loaded.info.name
        teacher = loaded.module
        data = _data_source(base, teacher, loaded.example_inputs, options, train_options, loss,
                            loaded.info.random_weights, world.device)  # one for every phase
        search_record = None
        chosen = pruned.check_removable(teacher, options.remove) if options.remove else []
        start = None
        if options.budget is not None:
            search_file = folder / "search.json"
            if options.resume and search_file.is_file():
                search_record = json.loads(search_file.read_text())
            else:
                if options.robust.enabled:
                    report("robust training")
                    start = _robust_phase(loaded, data, options, train_options, loss, world, folder,
                                          progress)
                report("block search")
                search_record = _search(start if start is not None else teacher, loaded,
                                        options, world.device, report)
                if world.main:
                    folder.mkdir(parents=True, exist_ok=True)
                    search_file.write_text(json.dumps(search_record))
            chosen = list(search_record["chosen"])
            if options.robust.enabled and start is None:
                start = _robust_phase(loaded, data, options, train_options, loss, world, folder,
                                      progress)
            if options.screen:
                report(f"screening {options.screen + 1} removed sets by a short recovery")
                chosen, start, screening = _screen(loaded, data, options, train_options, loss,
                                                   world, folder, chosen, start, progress)
                search_record["screening"] = screening
        report(f"recovering ({len(chosen)} blocks removed)")
        from snapc.train.recovery import RecoveryDistillation

        method = RecoveryDistillation(teacher, chosen, data, loss, start=start)
        result = train(method, train_options, folder / "recovery", world=world,
                       resume=_resuming(options, folder / "recovery"),
                       progress=None if progress is None else lambda p: progress("recovery", p))
        record = {**result.record, "model": options.model, "base": base,
                  "removed_blocks": chosen, "random_weights": loaded.info.random_weights,
                  "robust": asdict(options.robust) if options.robust.enabled else None,
                  "search": None if search_record is None else {
                      k: search_record.get(k) for k in ("chosen", "original_ms", "final_ms",
                                                        "seconds", "budget_ms", "screening")},
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        if world.main:
            _write_folder(options, loaded, result.student, chosen, record, search_record)
            shutil.rmtree(folder, ignore_errors=True)
        world.barrier()
        return record
    finally:
        teardown_world(world)


def _write_folder(options: RecoveryOptions, loaded: Any, student: nn.Module, chosen: list[str],
                  record: dict, search_record: dict | None) -> None:
    from snapc import pruned

    name = options.name or options.out.name
    with atomic_output_dir(options.out, force=options.force or options.resume) as tmp:
        pruned.save_pruned(
            tmp, student.cpu(), dict(loaded.module.config),
            pruned.PrunedRecord(name=name, base=loaded.info.base or loaded.info.name,
                                removed=tuple(chosen), random_weights=loaded.info.random_weights,
                                sampler=loaded.info.sampler, training="training.json"),
            dtype=torch.float16 if not loaded.info.random_weights else torch.float32)
        (tmp / "training.json").write_text(json.dumps(record, indent=1, default=str))
        if search_record is not None:
            (tmp / "search.json").write_text(json.dumps(search_record, indent=1))
