"""SearchBlocks: remove the blocks that cost the least quality per millisecond saved.

SnapFusion's architecture evolution as a pass. Every removable ResNet and transformer block not
pinned by the user is a candidate. For each, the cost model gives the latency its removal saves
on the target device, and a quality metric gives what it loses: by default the UNet-level
proxy, the normalised MSE of the noise prediction against the original model over
calibration triples; or any callable ``metric(removed: frozenset[str]) -> loss``. Greedy search
removes the candidate with the lowest ``quality lost / latency saved`` (SnapFusion's score) and
re-scores the rest after each removal, because blocks interact (``rescore=False`` scores once).
It stops at the latency budget or before crossing the quality floor.

Scoring is fast: one reference run caches each block's inputs, and a candidate's removal
re-runs only the part of the network after it (snapc.incremental.BypassEvaluator), batched
over the calibration triples, on a GPU when asked.

Requires: a graph with a block map; a device known to snapc.cost.
Records: one Change per removed block (rule ``search_remove``, ``cost_delta`` = -ms saved) and,
in ``info``, the Pareto front of every step, the per-block table and the time spent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from snapc.calibration import alphas_cumprod_for, calibration_inputs, to_x0, x0_bound_for
from snapc.errors import BudgetError, SnapcError, UnknownNameError
from snapc.graph import Graph
from snapc.incremental import BypassEvaluator
from snapc.passes.remove_blocks import remove_blocks
from snapc.pipeline import Change, PassContext, PassResult, register_pass

__all__ = ["SearchBlocks", "SearchStep", "search_blocks", "nmse"]

Metric = Callable[[frozenset[str]], float]
SPACES = ("eps", "x0")  # what the proxy compares: noise predictions or the x0 they imply


def nmse(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Return sum |c - r|^2 / sum |r|^2 (0 for identical outputs)."""
    ref, cand = reference.double(), candidate.double()
    return float(((cand - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


@dataclass(frozen=True)
class SearchStep:
    """One point of the search's front: the removed set, its latency and its quality loss."""

    removed: tuple[str, ...]
    latency_ms: float
    quality_loss: float
    chosen: str | None = None
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"removed": list(self.removed), "latency_ms": self.latency_ms,
                "quality_loss": self.quality_loss, "chosen": self.chosen, "score": self.score}


@dataclass
class _Proxy:
    """The default metric: NMSE of the noise prediction (``space="eps"``) or of the clipped x0
    prediction it implies (``space="x0"``) vs the original graph."""

    evaluator: BypassEvaluator
    transform: Callable[[torch.Tensor], torch.Tensor]
    reference: torch.Tensor | None = None
    evaluations: int = 0

    def __post_init__(self) -> None:
        self.reference = self.transform(self.evaluator.reference())

    def set_base(self, removed: frozenset[str]) -> float:
        out = self.evaluator.reference(removed)
        self.evaluations += 1
        return nmse(self.reference, self.transform(out))

    def with_removed(self, name: str) -> float:
        self.evaluations += 1
        return nmse(self.reference, self.transform(self.evaluator.with_removed(name)))


def search_blocks(
    graph: Graph,
    cost: Any,
    *,
    budget_ms: float | None = None,
    budget: float | None = None,
    keep: Iterable[str] = (),
    metric: Metric | None = None,
    rescore: bool = True,
    quality_floor: float | None = None,
    calibration: int = 8,
    seed: int = 0,
    eval_device: str = "cpu",
    space: str = "eps",
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the greedy search and return its record (chosen set, front, per-block table).

    ``cost`` is a snapc.cost.CostModel. ``budget_ms`` is a latency target on its device;
    ``budget`` a fraction of the original latency; with neither, the search runs to the end
    (the whole front). ``space`` is where the proxy compares outputs: the noise prediction
    (``eps``) or the clipped x0 prediction it implies (``x0``). Raises BudgetError when the
    budget cannot be met even by removing every allowed block, and UnknownNameError for an
    unknown pinned block.
    """
    start_time = time.perf_counter()
    blocks = {b.name: b for b in graph.blocks}
    keep = tuple(keep)
    for name in keep:
        if name not in blocks:
            raise UnknownNameError("block", name, list(blocks))
    candidates = [b for b in blocks.values() if b.removable and b.name not in keep]
    estimate = cost.estimate_graph(graph)
    original_ms = estimate.total_ms
    saving = {b.name: cost.saving_ms(graph, b) for b in candidates}
    target = budget_ms if budget_ms is not None else (
        original_ms * budget if budget is not None else -math.inf)
    floor_ms = original_ms - sum(saving.values())
    if target > -math.inf and floor_ms > target:
        raise BudgetError(
            f"budget {target:.1f} ms on {cost.device.name} is out of reach: removing all "
            f"{len(candidates)} allowed blocks gives {floor_ms:.1f} ms (original "
            f"{original_ms:.1f} ms); raise the budget or pin fewer blocks")

    if metric is None:
        inputs = tuple(t.to(eval_device) for t in calibration_inputs(graph, calibration, seed))
        progress(f"tracing at calibration batch {calibration}")
        evaluator = BypassEvaluator(graph.at_batch(inputs), inputs, device=eval_device)
        if space == "x0":
            schedule, bound = alphas_cumprod_for(graph), x0_bound_for(graph)

            def transform(eps: torch.Tensor) -> torch.Tensor:
                return to_x0(eps, inputs[0], inputs[1], schedule, bound)
        elif space == "eps":
            def transform(eps: torch.Tensor) -> torch.Tensor:
                return eps
        else:
            raise ValueError(f"proxy space must be one of {SPACES}, not {space!r}")
        proxy: _Proxy | None = _Proxy(evaluator, transform)
    else:
        proxy = None

    def loss_of(removed_set: frozenset[str]) -> float:
        """Loss of a removed set; with the proxy this also caches its inputs for scoring."""
        return proxy.set_base(removed_set) if proxy is not None else metric(removed_set)

    def loss_adding(removed_set: frozenset[str], name: str) -> float:
        """Loss of removed_set + name (the proxy re-runs only what follows the block)."""
        return proxy.with_removed(name) if proxy is not None else metric(removed_set | {name})

    removed: list[str] = []
    latency, current = original_ms, 0.0
    front = [SearchStep((), latency, 0.0)]
    single_loss: dict[str, float] = {}
    losses: dict[str, float] = {}
    scores: dict[str, float] = {}
    stop_reason = "every allowed block removed"
    while latency > target:
        remaining = [b.name for b in candidates if b.name not in removed]
        if not remaining:
            break
        if rescore or not single_loss:
            base = frozenset(removed)
            current = loss_of(base)
            losses = {}
            for i, name in enumerate(remaining):
                progress(f"step {len(removed) + 1}: scoring {name} ({i + 1}/{len(remaining)})")
                losses[name] = loss_adding(base, name)
            single_loss = single_loss or dict(losses)
            scores = {n: (losses[n] - current) / max(saving[n], 1e-9) for n in remaining}
        best = min(remaining, key=lambda n: (scores[n], -saving[n]))
        new_loss = losses[best] if rescore else loss_of(frozenset([*removed, best]))
        if quality_floor is not None and new_loss > quality_floor:
            stop_reason = f"next removal ({best}) would cross the quality floor"
            break
        removed.append(best)
        latency -= saving[best]
        current = new_loss
        front.append(SearchStep(tuple(removed), latency, new_loss, best, scores.pop(best)))
        if latency <= target:
            stop_reason = "budget met"
    if target > -math.inf and latency > target and stop_reason != "budget met":
        raise BudgetError(
            f"budget {target:.1f} ms not met: {stop_reason} at {latency:.1f} ms; "
            "lower the quality floor or raise the budget")
    table = [{
        "name": b.name, "kind": b.kind, "stage": b.stage, "macs": b.macs,
        "latency_ms": estimate.per_block[b.name].ms,
        "latency_source": estimate.per_block[b.name].source,
        "saving_ms": saving.get(b.name), "quality_cost": single_loss.get(b.name),
        "pinned": b.name in keep, "removed": b.name in removed,
    } for b in blocks.values()]
    return {
        "device": cost.device.name, "original_ms": original_ms, "final_ms": latency,
        "target_ms": None if target == -math.inf else target, "chosen": removed,
        "stop": stop_reason, "front": [s.to_json() for s in front], "blocks": table,
        "rescore": rescore, "evaluations": proxy.evaluations if proxy else None,
        "metric": f"proxy_nmse_{space}" if metric is None
        else getattr(metric, "__name__", "custom"),
        "calibration": calibration, "seconds": time.perf_counter() - start_time,
    }


@register_pass
@dataclass(frozen=True)
class SearchBlocks:
    """Remove the blocks with the least quality lost per ms saved on a device until a latency
    budget is met (SnapFusion's architecture evolution, greedy with re-scoring)."""

    budget_ms: float | None = None
    budget: float | None = None
    device: str = "iphone14pro-ane"
    dtype: str | None = None
    table: str | None = None
    keep: tuple[str, ...] = ()
    rescore: bool = True
    quality_floor: float | None = None
    calibration: int = 8
    seed: int = 0
    eval_device: str = "cpu"
    space: str = "eps"
    metric: Metric | None = field(default=None, compare=False)
    name = "search_blocks"
    level = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(self.keep))

    def check_values(self) -> None:
        """Raise SnapcError naming the fix for options that cannot work whatever the device:
        two budgets, a budget fraction outside (0, 1), a budget in ms or a quality floor that
        is not positive, an unknown proxy space or scoring device, no calibration triple."""
        if self.budget is not None and self.budget_ms is not None:
            raise SnapcError("--budget and --budget-ms both give the latency budget; give one: "
                             "--budget F (fraction of the original) or --budget-ms MS")
        if self.budget is not None and not 0 < self.budget < 1:
            raise SnapcError(f"--budget {self.budget} is not a fraction of the original "
                             "latency; give 0 < F < 1 (0.8 keeps 80% of it)")
        if self.budget_ms is not None and not 0 < self.budget_ms < math.inf:
            raise SnapcError(f"--budget-ms {self.budget_ms} is not a latency; give "
                             "milliseconds > 0")
        if self.quality_floor is not None and not 0 < self.quality_floor < math.inf:
            raise SnapcError(f"--quality-floor {self.quality_floor} is not a proxy loss; give "
                             "an NMSE > 0 (e.g. 0.05)")
        if self.calibration < 1:
            raise SnapcError(f"--calibration {self.calibration}: the proxy needs at least one "
                             "calibration triple")
        if self.space not in SPACES:
            raise SnapcError(f"--proxy-space {self.space!r} is not a proxy space; use one of "
                             f"{', '.join(SPACES)}")
        kind, _, index = str(self.eval_device).partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise SnapcError(f"--eval-device {self.eval_device!r} is not a device; use cpu or "
                             "cuda (cuda:N)")
        if kind == "cuda" and not torch.cuda.is_available():
            raise SnapcError(f"--eval-device {self.eval_device}: torch sees no CUDA device "
                             "here; use --eval-device cpu")

    def check(self) -> None:
        """Raise SnapcError naming the fix when the search cannot run, before any model is
        loaded: :meth:`check_values`, no device, an unknown device name or a bad profile file,
        a latency table that is missing, malformed or measured on another device. Reads the
        device profile and the table (cheap: no graph)."""
        from snapc.cost import builtin_devices

        self.check_values()
        if not self.device:
            raise SnapcError("block search needs a device: --device NAME (one of "
                             f"{', '.join(builtin_devices())}) or a .toml/.json profile")
        self.cost_model(PassContext())

    def cost_model(self, ctx: PassContext) -> Any:
        """Return the context's cost model, or one for ``device`` (fp16 on phones)."""
        if ctx.cost is not None:
            return ctx.cost
        from snapc.cost import CostModel

        dtype = self.dtype or ("fp32" if self.device in ("local-cpu",) else "fp16")
        return CostModel(self.device, table=self.table, dtype=dtype)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph without the chosen blocks; ``info`` holds the search record."""
        self.check_values()
        record = search_blocks(
            graph, self.cost_model(ctx), budget_ms=self.budget_ms, budget=self.budget,
            keep=self.keep, metric=self.metric, rescore=self.rescore,
            quality_floor=self.quality_floor, calibration=self.calibration, seed=self.seed,
            eval_device=self.eval_device, space=self.space,
            progress=ctx.options.get("progress", lambda _: None))
        new, removal = remove_blocks(graph, record["chosen"])
        saving = {row["name"]: row["saving_ms"] for row in record["blocks"]}
        changes = tuple(Change(self.name, "search_remove", c.target, removed=c.removed,
                               detail={**c.detail, "step": i + 1},
                               cost_delta=-(saving[c.target] or 0.0))
                        for i, c in enumerate(removal))
        return PassResult(new, changes, info={"search": record})
