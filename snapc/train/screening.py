"""Recovery-aware choice of the removed set: score candidate sets by a short recovery.

Quality as removed does not predict quality after recovery (on ``shapes`` at budget 0.5 a set
at 0.011 adherence as removed recovered to 0.920 and one at 0.072 to 0.939; at budget 0.3 the
search's pick recovered to 0.482 and a random set to 0.853). What a set becomes after recovery
is measured most directly by recovering it: each candidate set (the block search's pick plus
seeded random sets that meet the same latency budget) is recovered for a short time, scored,
and the best one is recovered in full, starting from its screened weights.

The score is the full metric where there is one (1 - prompt adherence on ``shapes``-family
models, a fixed set of validation-style prompts and few DDIM steps) and otherwise the
recovery loss on a batch the training never draws (the distillation gap to the teacher).

Which cheap measurement best predicts quality after the full recovery is measured by
:func:`recovery_probe`: one short recovery of a set in segments, with measurements (adherence,
held-out loss and its parts, of the EMA and the raw weights) timed at the end of each segment;
``snapc.train.estimators`` turns a probe into estimators and ranks them (bench/screening_study.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from snapc.graph import Graph
from snapc.train.checkpoint import latest_checkpoint, load_checkpoint
from snapc.train.data import NoisedBatches
from snapc.train.distributed import World
from snapc.train.loop import Batch, Method, TrainProgress, train
from snapc.train.options import TrainOptions

__all__ = ["Candidate", "predicted_latency", "random_sets", "adherence_score",
           "full_metric_score", "heldout_loss_score", "HELDOUT_SEED", "heldout_batches",
           "heldout_parts", "Measure", "RecoveryProbe", "recovery_probe"]

# Training batch ``step`` is drawn from seed (seed * 1_000_003 + step * 7919 + stream * 104_729)
# mod 2**63-1 (snapc.train.loop.batch_generator): below 2**40 for seeds < 10**5 and steps < 10**8,
# so a generator seeded with this never draws a training batch.
HELDOUT_SEED = 2**41 + 12_345


@dataclass(frozen=True)
class Candidate:
    """A removed set to screen: where it came from and its predicted latency."""

    origin: str  # "search" or "random-<seed>"
    removed: tuple[str, ...]
    latency_ms: float

    def to_json(self) -> dict:
        """Return the candidate as a JSON-ready dict."""
        return {"origin": self.origin, "removed": list(self.removed),
                "latency_ms": round(self.latency_ms, 4)}


def predicted_latency(graph: Graph, cost, removed: Sequence[str]) -> float:
    """Return the predicted latency (ms) of ``graph`` without ``removed`` on cost's device."""
    from snapc.passes import remove_blocks

    pruned, _ = remove_blocks(graph, removed)
    return cost.estimate_graph(pruned).total_ms


def random_sets(graph: Graph, cost, target_ms: float, seeds: Sequence[int],
                keep: Sequence[str] = ()) -> list[Candidate]:
    """Return one random removed set per seed that meets ``target_ms`` on ``cost``'s device.

    Each set takes blocks in a random order until the predicted latency is within the target
    (the smallest prefix that fits), so sets differ in what they remove, not in how far past
    the budget they go. Per-block savings pick the prefix; the pruned graph's own estimate
    confirms it (one export per set, more only where savings do not add up exactly).
    """
    names = [b.name for b in graph.blocks if b.removable and b.name not in set(keep)]
    saving = {name: cost.saving_ms(graph, graph.blocks[name]) for name in names}
    original = cost.estimate_graph(graph).total_ms
    out = []
    for i, seed in enumerate(seeds):
        order = names[:]
        random.Random(seed).shuffle(order)
        total, k = 0.0, 0
        while k < len(order) and original - total > target_ms:
            total += saving[order[k]] or 0.0
            k += 1
        while k > 1 and predicted_latency(graph, cost, order[:k - 1]) <= target_ms:
            k -= 1  # savings over-estimated: a shorter prefix fits
        while k <= len(order):
            ms = predicted_latency(graph, cost, order[:k])
            if ms <= target_ms:
                out.append(Candidate(f"random-{i}", tuple(order[:k]), ms))
                break
            k += 1
    return out


def adherence_score(prompts: int = 100, steps: int = 10, guidance: float = 3.0,
                    seed: int = 321) -> Callable[[nn.Module, torch.device], float]:
    """Return ``score(unet, device) -> 1 - prompt adherence`` for shapes-family UNets.

    Prompts are validation-style prompts drawn with a seed of their own (not the evaluation
    protocol's), sampled with DDIM and CFG.
    """
    from snapc.quality import generate, prompt_adherence, validation_codes
    from snapc.shapes.model import load_text_encoder

    codes = validation_codes(prompts, seed=seed)

    def score(unet: nn.Module, device: torch.device) -> float:
        text = load_text_encoder().to(device)
        images = generate(unet.eval(), text, codes, steps=steps, guidance=guidance,
                          device=device, seed=seed, batch=prompts)
        return 1.0 - prompt_adherence(images, codes)["adherence"]

    return score


def full_metric_score(base: str, prompts: int = 100, steps: int = 10
                      ) -> Callable[[nn.Module, torch.device], float] | None:
    """Return the full-metric screening score of a model family (1 - prompt adherence, its
    pictures decoded for shapes-latent), or None for a family without one."""
    from snapc.families import is_latent_family, is_shapes_family

    if is_shapes_family(base):
        return adherence_score(prompts, steps)
    if is_latent_family(base):
        from snapc.shapes_latent.family import latent_adherence_score

        return latent_adherence_score(prompts, steps)
    return None


def heldout_batches(data: NoisedBatches, n: int, chunk: int,
                    seed: int = HELDOUT_SEED) -> list[Batch]:
    """Return ``n`` fixed held-out samples of ``data`` in batches of at most ``chunk``.

    Samples, captions and noise come from a generator training never uses (``seed``);
    timesteps are spread evenly over the whole schedule (0 .. T-1) instead of drawn, so every
    removed set is scored on the same noise levels. Same seed and device, same batches.
    """
    if n < 1 or chunk < 1:
        raise ValueError(f"held-out batches need n >= 1 and chunk >= 1, not {n} and {chunk}")
    gen = torch.Generator(device=data.device).manual_seed(seed)
    x0, context = data.clean(gen, n)
    t = torch.linspace(0, data.schedule.steps - 1, n, device=data.device).round().long()
    noise = torch.randn(x0.shape, generator=gen, device=data.device)
    x_t = data.schedule.add_noise(x0, noise, t)
    return [{"x_t": x_t[lo:lo + chunk], "t": t[lo:lo + chunk].float(),
             "noise": noise[lo:lo + chunk], "context": context[lo:lo + chunk], "step": -1}
            for lo in range(0, n, chunk)]


def heldout_parts(method_loss: Callable[[nn.Module, dict], tuple[torch.Tensor, dict]],
                  model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Return the loss of ``model`` on ``batches`` and its named parts, averaged per sample.

    ``method_loss`` is a method's ``loss`` (for RecoveryDistillation: ``loss``, ``task``,
    ``output_kd``, ``feature_kd``); ``model`` must be the module that method trains (its
    feature hooks sit there). Runs without gradients in fp32; leaves ``model`` in eval mode.
    """
    totals: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for b in batches:
            loss, parts = method_loss(model.eval(), b)
            rows = int(b["x_t"].shape[0])
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * rows
            count += rows
    return {k: v / count for k, v in totals.items()}


def heldout_loss_score(method_loss: Callable[[nn.Module, dict], tuple[torch.Tensor, dict]],
                       batches: Sequence[dict]) -> Callable[[nn.Module, torch.device], float]:
    """Return ``score(unet, device)``: the mean distillation loss on held-out batches."""

    def score(unet: nn.Module, device: torch.device) -> float:
        with torch.no_grad():
            return float(sum(method_loss(unet.eval(), b)[0].item() for b in batches)
                         / len(batches))

    return score


# A measurement of the student: one number, or named numbers (held-out loss and its parts).
Measure = Callable[[nn.Module], float | dict[str, float]]


@dataclass
class RecoveryProbe:
    """One short recovery of a removed set, measured along the way.

    ``points`` holds one entry per probe point, the start first: ``at`` (the requested
    seconds or steps), ``step`` and ``train_seconds`` reached, and ``measures``:
    ``{weights: {measure: {"value": ..., "seconds": ...}}}`` with weights ``start`` at the
    start, else ``ema`` and/or ``raw``. ``history`` is the training loss curve
    (``snapc.train.loop``: step, loss, seconds and the loss parts every ``log_every`` steps).
    """

    by: str
    points: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the probe as a JSON-ready dict."""
        return {"by": self.by, "points": self.points, "history": self.history}


def _timed(measures: Mapping[str, Measure], unet: nn.Module,
           device: torch.device) -> dict[str, dict[str, Any]]:
    out = {}
    for name, measure in measures.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        value = measure(unet)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = {"value": value, "seconds": round(time.perf_counter() - start, 3)}
    return out


def recovery_probe(
    method: Method,
    options: TrainOptions,
    at: Sequence[float],
    checkpoints: Path,
    *,
    world: World,
    measures: Mapping[str, Measure],
    weights: Sequence[Literal["ema", "raw"]] = ("ema", "raw"),
    by: Literal["seconds", "steps"] = "seconds",
    progress: Callable[[TrainProgress], None] | None = None,
) -> RecoveryProbe:
    """Recover ``method.student`` in segments ending at each point of ``at``; measure each.

    The student is measured as it starts (weights ``start``), then training runs with
    ``options`` (its ``steps``/``minutes`` replaced) up to each point of ``at`` (training
    seconds or steps, increasing) and the EMA and/or raw weights are measured there; every
    segment resumes the previous one from its checkpoint in the empty folder ``checkpoints``,
    so the batches, optimiser and EMA are those of one uninterrupted run (snapc.train.loop)
    and measuring takes no training time. Each measurement is timed (a search can know what
    it costs). ``measures`` receive ``method.student``. Returns with ``method.student``
    holding the EMA weights of the last segment, as :func:`snapc.train.train` does.
    Requires a constant learning rate after the warm-up (a decay to each segment's end
    would not be one run's schedule).
    """
    if options.lr_decay != "constant":
        raise ValueError(f"a probe trains in segments: it needs lr_decay 'constant', not "
                         f"{options.lr_decay!r}")
    if not at or any(b <= a for a, b in zip(at, at[1:], strict=False)) or at[0] <= 0:
        raise ValueError(f"probe points must be positive and increasing, not {list(at)}")
    if not set(weights) <= {"ema", "raw"} or not weights:
        raise ValueError(f"weights are 'ema' and/or 'raw', not {list(weights)}")
    student = method.student
    probe = RecoveryProbe(by)
    probe.points.append({"at": 0, "step": 0, "train_seconds": 0.0,
                         "measures": {"start": _timed(measures, student, world.device)}})
    for k, point in enumerate(at):
        bound = ({"steps": int(point), "minutes": None} if by == "steps"
                 else {"steps": None, "minutes": point / 60})
        result = train(method, replace(options, **bound), checkpoints, world=world,
                       resume=k > 0, progress=progress)
        measured = {}
        if "ema" in weights:
            measured["ema"] = _timed(measures, student, world.device)
        if "raw" in weights:
            ema_state = {n: v.detach().clone() for n, v in student.state_dict().items()}
            student.load_state_dict(load_checkpoint(latest_checkpoint(checkpoints))["student"])
            measured["raw"] = _timed(measures, student, world.device)
            student.load_state_dict(ema_state)
        probe.points.append({"at": point, "step": result.steps,
                             "train_seconds": round(result.seconds, 2), "measures": measured})
        probe.history = result.history
    return probe
