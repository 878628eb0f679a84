"""Which cheap estimator predicts a removed set's quality after full recovery (issue 16)?

For each distinct removed set in the rows of ``bench/out/recovery.json`` (optionally only
``--budgets``), ONE short recovery with bench/recovery.py's recipe (RecoveryDistillation:
task + output KD + feature KD, batch 512, lr 1e-4, warm-up 100, EMA 0.995, seed 0, bf16 on
CUDA; for rows recovered from the original weights it is their first seconds) runs for
``--seconds S``. The set is measured as removed and after each ``--at`` point of training
(snapc.train.screening.recovery_probe; measuring takes no training time), EMA and raw
weights, each measurement timed:

- adherence on 100 validation-style prompts x 10 DDIM steps (``snapc distill --screen``'s
  score, snapc.train.screening.adherence_score);
- the held-out distillation loss, total and its task / output-KD / feature-KD parts, on 1024
  fixed samples training never draws, timesteps spread over the schedule.

snapc.train.estimators derives the estimators from that (the training loss, its slope over
the second half, ``a + b * step^-c`` fits of the held-out and training losses evaluated at the
full recovery's steps) and zero-cost ones (parameters / attention / ResNet blocks kept, blocks
removed, predicted latency, adherence as removed from the row). One entry per set is written
to ``bench/out/screening_study.json`` as it finishes; sets already there are skipped, so a run
can be split. ``--report`` prints the markdown table (per estimator: Spearman's rho with the
recovered adherence over all sets and within each budget, concordant pairs and top-1 within
budgets, GPU seconds per candidate) and draws ``bench/screening_study.png``.

GPU plan (one H200). Training at batch 512 runs 7.9-11.7 it/s (the rows: 2523 steps in 3.6
min at budget 0.3, 1470 in 2.5 min at 0.5, 1190 at 0.7), so 30 s is ~290-350 steps at budgets
0.5-0.3 (``--screen`` used 24 s). Per set: S s of training, (1 + points x weights)
measurements of ~1.5 s (adherence) + ~0.3 s (held-out), ~1 s per point (a checkpoint written
and read back) and ~3 s of set-up; ~30 s to start. The 8 sets of budgets 0.3 and 0.5 at S = 30,
points 10 20 30, EMA and raw: 8 x (30 + 7 x 1.8 + 3 + 3) + 30 s ~ 7 min (the script prints
this plan first and, per set, what it took and what is left)::

    python bench/screening_study.py --budgets 0.3 0.5 --seconds 30 --at 10 20 30
    python bench/screening_study.py --report          # table + bench/screening_study.png

Budget 0.3 goes first (the widest spread of recovered adherence: 0.820-0.931). With time left,
the same command with ``--budgets 0.7`` adds its 4 sets (~3.7 min) to the same file (the
protocol must match). Caveat of the rows: the snapc set at 0.3 had 2.0 min of full recovery
after its 24-s screen, the random sets 3.6 min, so its recovered adherence is not what equal
training would give (fits use each row's own steps; the report names such rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapc.artifacts import atomic_output_file  # noqa: E402
from snapc.errors import SnapcError  # noqa: E402

ROWS = REPO / "bench" / "out" / "recovery.json"
OUT = REPO / "bench" / "out" / "screening_study.json"
PLOT = REPO / "bench" / "screening_study.png"
# Assumed H200 costs for the printed plan (seconds): one adherence measurement (100 prompts x
# 10 steps), one held-out loss, writing and reading back one checkpoint, one set's set-up,
# the start; training steps per second at batch 512 (for --steps).
PLAN_COSTS = {"adherence": 1.5, "heldout": 0.3, "checkpoint": 1.0, "set": 3.0, "start": 30.0,
              "steps_per_s": 10.0}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _horizon_steps(row: dict) -> float:
    """Return the steps of the row's full recovery, counting a screened start's steps (at the
    row's own step rate) when it started from its screened weights."""
    steps = float(row["steps"])
    screened = [c for c in row.get("screening") or []
                if sorted(c["removed"]) == sorted(row["removed"])]
    if screened and row.get("gpu_minutes"):
        steps += screened[0]["seconds"] * row["steps"] / (60 * row["gpu_minutes"])
    return steps


def _label(row: dict) -> str:
    seed = f"#{row['seed']}" if row.get("seed") is not None else ""
    return f"{row['method']}{seed}@{row['budget']}"


def select_sets(rows: list[dict], budgets: list[float] | None) -> list[dict]:
    """Return one study set per distinct removed set of ``rows`` at ``budgets`` (all when
    None), in the order of ``budgets``: key, removed, budget, target and the rows."""
    if budgets:
        picked = [r for b in budgets for r in rows if math.isclose(r["budget"], b)]
        if not picked:
            have = sorted({r["budget"] for r in rows})
            raise SnapcError(f"no rows at budgets {budgets}; the rows have {have}")
    else:
        picked = list(rows)
    grouped: dict[tuple[str, ...], list[dict]] = {}
    for row in picked:
        grouped.setdefault(tuple(sorted(row["removed"])), []).append(row)
    sets = []
    for removed, mine in grouped.items():
        sets.append({
            "key": ",".join(removed), "removed": list(removed), "budget": mine[0]["budget"],
            "label": " ".join(_label(r) for r in mine),
            "adherence": sum(r["adherence"] for r in mine) / len(mine),
            "horizon_steps": round(sum(_horizon_steps(r) for r in mine) / len(mine), 1),
            "rows": [{k: r.get(k) for k in ("budget", "method", "seed", "adherence",
                                            "adherence_before", "fd", "latency_ms", "steps",
                                            "gpu_minutes")}
                     | {"screened_start": _horizon_steps(r) != r["steps"]} for r in mine]})
    return sets


def _protocol(args, points: list[float]) -> dict:
    return {"by": "steps" if args.steps else "seconds", "points": points,
            "weights": args.weights, "batch": args.batch, "lr": args.lr, "warmup": 100,
            "lr_decay": "constant", "ema": 0.995, "seed": 0, "feature_kd": args.feature_kd,
            "adherence": {"prompts": args.prompts, "steps": args.sampling_steps,
                          "guidance": 3.0, "seed": 321},
            "heldout": {"samples": args.heldout, "timesteps": "evenly over 0..T-1"}}


def _points(args) -> list[float]:
    length = args.steps or args.seconds
    if not length > 0 or any(not a > 0 for a in args.at):
        raise SnapcError("--seconds/--steps and every --at must be > 0")
    return sorted({a for a in args.at if a < length} | {length})


def _plan(todo: int, points: list[float], args) -> str:
    training = points[-1] / PLAN_COSTS["steps_per_s"] if args.steps else points[-1]
    measures = (1 + len(points) * len(args.weights)) * (PLAN_COSTS["adherence"]
                                                         + PLAN_COSTS["heldout"])
    per_set = training + measures + len(points) * PLAN_COSTS["checkpoint"] + PLAN_COSTS["set"]
    total = PLAN_COSTS["start"] + todo * per_set
    return (f"plan: {todo} sets x ~{per_set:.0f} s + ~{PLAN_COSTS['start']:.0f} s start "
            f"~ {total / 60:.1f} min (assumed H200 costs {PLAN_COSTS})")


def _write(path: Path, data: dict) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def _train_options(args, steps: int = 1):
    """Return bench/recovery.py's training options (the probe sets steps/minutes per point;
    log_every only makes the recorded loss curve finer)."""
    from snapc.train import TrainOptions

    return TrainOptions(steps=steps, batch=args.batch, lr=args.lr, warmup=100,
                        lr_decay="constant", ema=0.995, seed=0, device=args.device,
                        checkpoint_every=10_000, log_every=10)


def _warm_up(teacher, data, removed: list[str], args, world) -> None:
    """Train a throwaway student a few steps and sample with it once, so CUDA's one-time
    start-up (context, kernels, cuBLAS) is not charged to the first set's seconds."""
    from snapc.train import RecoveryDistillation, RecoveryLoss, train
    from snapc.train.screening import adherence_score

    method = RecoveryDistillation(teacher, removed, data, RecoveryLoss(feature_kd=args.feature_kd))
    with tempfile.TemporaryDirectory(prefix="screening-study-warm-up-") as tmp:
        train(method, _train_options(args, steps=5), Path(tmp), world=world)
    adherence_score(args.prompts, args.sampling_steps)(method.student, world.device)


def _probe_set(entry: dict, teacher, data, heldout: list[dict], args, points: list[float],
               world) -> dict:
    """Run the probe of one set (``heldout``: the fixed held-out batches); return its entry."""
    from snapc.train import RecoveryDistillation, RecoveryLoss
    from snapc.train.estimators import probe_estimates, set_structure, structure_estimates
    from snapc.train.screening import adherence_score, heldout_parts, recovery_probe

    started = time.perf_counter()
    method = RecoveryDistillation(teacher, entry["removed"], data,
                                  RecoveryLoss(feature_kd=args.feature_kd))
    score = adherence_score(args.prompts, args.sampling_steps)
    measures = {"adherence": lambda unet: 1.0 - score(unet, world.device),
                "heldout": lambda unet: heldout_parts(method.loss, unet, heldout)}
    structure = set_structure(teacher, method.student, entry["removed"])
    rows = entry["rows"]
    structure["adherence_before"] = sum(r["adherence_before"] for r in rows) / len(rows)
    structure["latency_ms"] = sum(r["latency_ms"] for r in rows) / len(rows)
    with tempfile.TemporaryDirectory(prefix="screening-study-") as tmp:
        probe = recovery_probe(method, _train_options(args), points, Path(tmp) / "checkpoints",
                               world=world, measures=measures, weights=args.weights,
                               by="steps" if args.steps else "seconds")
    estimates = structure_estimates(structure) | probe_estimates(probe.to_json(),
                                                                 entry["horizon_steps"])
    return {**entry, "structure": structure, "probe": probe.to_json(),
            "estimators": {k: e.value for k, e in estimates.items()},
            "wall_seconds": round(time.perf_counter() - started, 1)}


def _measure_seconds(entry: dict) -> str:
    """Return the mean seconds of each measure over the entry's probe points."""
    seconds: dict[str, list[float]] = {}
    for point in entry["probe"]["points"]:
        for measures in point["measures"].values():
            for name, m in measures.items():
                seconds.setdefault(name, []).append(m["seconds"])
    return ", ".join(f"{n} {sum(v) / len(v):.2f} s" for n, v in seconds.items())


def run(args) -> None:
    """Probe every selected set not yet in ``args.out``; write the file after each."""
    from snapc.models import load_model
    from snapc.train.data import ShapesScenes
    from snapc.train.distributed import setup_world, teardown_world
    from snapc.train.screening import heldout_batches

    if not args.rows.is_file():
        raise SnapcError(f"{args.rows} not found: run bench/recovery.py first or pass --rows")
    points = _points(args)
    protocol = _protocol(args, points)
    study = _load(args.out) or {"protocol": protocol, "sets": []}
    if study.get("protocol") != protocol:
        raise SnapcError(f"{args.out} was measured with another protocol "
                         f"({study.get('protocol')}); pass --out NEW.json or delete it")
    done = {s["key"] for s in study["sets"]}
    sets = select_sets(_load(args.rows).get("rows", []), args.budgets)
    todo = [s for s in sets if s["key"] not in done]
    print(f"{len(sets)} sets, {len(sets) - len(todo)} already in {args.out.name}; "
          + _plan(len(todo), points, args), flush=True)
    if not todo:
        return
    world = setup_world(args.device)
    try:
        machine = torch.cuda.get_device_name() if world.device.type == "cuda" else "cpu"
        teacher = load_model("shapes").module
        data = ShapesScenes(args.batch, 0, world.device, 0.1)  # bench/recovery.py's data
        heldout = heldout_batches(data, args.heldout, chunk=args.batch)
        if world.device.type == "cuda":
            _warm_up(teacher, data, todo[0]["removed"], args, world)
        for k, entry in enumerate(todo):
            print(f"== {entry['label']} ({len(entry['removed'])} blocks)", flush=True)
            result = _probe_set(entry, teacher, data, heldout, args, points, world)
            result["machine"] = machine
            study["sets"].append(result)
            study["machine"] = machine
            _write(args.out, study)
            last = result["probe"]["points"][-1]
            print(f"  {last['step']} steps in {last['train_seconds']:.1f} s, wall "
                  f"{result['wall_seconds']:.1f} s ({_measure_seconds(result)}); recovered "
                  f"(full) {entry['adherence']:.3f}; {len(todo) - k - 1} sets left, ~"
                  f"{(len(todo) - k - 1) * result['wall_seconds'] / 60:.1f} min", flush=True)
    finally:
        teardown_world(world)


def _agreements(sets: list[dict]) -> list[tuple[str, float | None, object]]:
    from snapc.train.estimators import probe_estimates, rank_agreement, structure_estimates

    per_set = [structure_estimates(s["structure"]) | probe_estimates(s["probe"],
                                                                      s["horizon_steps"])
               for s in sets]
    names = list(dict.fromkeys(n for e in per_set for n in e))
    targets, groups = [s["adherence"] for s in sets], [s["budget"] for s in sets]
    out = []
    for name in names:
        found = [e[name] for e in per_set if name in e]
        costs = [e.cost_s for e in found if e.cost_s is not None and e.value is not None]
        values = [e[name].value if name in e else None for e in per_set]
        agreement = rank_agreement(values, targets, groups, found[0].higher_is_better)
        out.append((name, sum(costs) / len(costs) if costs else None, agreement))
    return out


def _fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.2f}"


def _sort_key(item) -> tuple[float, float]:
    _, _, a = item
    return (-a.mean_within if math.isfinite(a.mean_within) else math.inf,
            -a.rho_all if math.isfinite(a.rho_all) else math.inf)


def report(path: Path, plot_path: Path | None) -> str:
    """Return the markdown table of every estimator's rank agreement; draw the best one."""
    study = _load(path)
    sets = study.get("sets", [])
    if len(sets) < 2:
        raise SnapcError(f"{path} holds {len(sets)} sets; run the study first (at least 2)")
    found = _agreements(sets)
    rows = sorted((r for r in found if r[2].n), key=_sort_key)
    empty = [name for name, _, a in found if not a.n]
    budgets = sorted({g for _, _, a in rows for g in a.rho_within})
    lines = [f"Estimators of adherence after full recovery: {len(sets)} sets, "
             f"protocol {study['protocol']['by']} {study['protocol']['points']} on "
             f"{study.get('machine', '?')}. rho is Spearman's, oriented (+1: orders the sets "
             "as the full recovery does); pairs and top-1 within budgets.", "",
             "| estimator | GPU s / candidate | rho all (n) | "
             + " | ".join(f"rho @{b} (n)" for b in budgets)
             + " | mean rho within | pairs within | top-1 |",
             "|---|---|---|" + "---|" * len(budgets) + "---|---|---|"]
    for name, cost, a in rows:
        within = " | ".join(f"{_fmt(a.rho_within.get(b))} ({a.n_within.get(b, 0)})"
                           for b in budgets)
        good, pairs = a.pairs_within
        lines.append(f"| {name} | {'-' if cost is None else f'{cost:.1f}'} | "
                     f"{_fmt(a.rho_all)} ({a.n}) | {within} | {_fmt(a.mean_within)} | "
                     f"{good:g}/{pairs} | {a.top1_within[0]}/{a.top1_within[1]} |")
    if empty:
        lines.append("\nNo value for any set (too few points for a fit or a slope): "
                     + ", ".join(empty))
    screened = [r for s in sets for r in s["rows"] if r.get("screened_start")]
    if screened:
        lines.append("\nRows whose full recovery started from screened weights (their "
                     "recovered adherence had other training): "
                     + ", ".join(_label(r) for r in screened))
    if plot_path is not None:
        best = rows[0][0]
        _plot(sets, best, plot_path)
        lines.append(f"\nBest estimator: {best}, drawn in {plot_path.name}")
    return "\n".join(lines)


def _plot(sets: list[dict], name: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    from snapc.plots import save_figure
    from snapc.train.estimators import probe_estimates, structure_estimates

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for budget in sorted({s["budget"] for s in sets}):
        mine = [s for s in sets if s["budget"] == budget]
        xy = [((structure_estimates(s["structure"]) | probe_estimates(
            s["probe"], s["horizon_steps"]))[name].value, s["adherence"], s["label"])
            for s in mine]
        xy = [p for p in xy if p[0] is not None]
        ax.scatter([x for x, _, _ in xy], [y for _, y, _ in xy], label=f"budget {budget}")
        for x, y, label in xy:
            ax.annotate(label.split("@")[0], (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel(name)
    ax.set_ylabel("adherence after full recovery (1000 prompts)")
    ax.set_title("Screening estimator vs quality after full recovery (shapes)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=Path, default=ROWS, help="bench/recovery.py's rows")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--budgets", type=float, nargs="*", help="only these budgets (default all)")
    p.add_argument("--seconds", type=float, default=60.0, help="training seconds per set")
    p.add_argument("--steps", type=int, default=None,
                   help="probe by training steps instead (then --at counts steps)")
    p.add_argument("--at", type=float, nargs="*", default=[10, 20, 30, 45, 60],
                   help="probe points (training seconds, or steps with --steps)")
    p.add_argument("--weights", nargs="+", choices=["ema", "raw"], default=["ema", "raw"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--feature-kd", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=100, help="adherence prompts per measure")
    p.add_argument("--sampling-steps", type=int, default=10, help="DDIM steps per measure")
    p.add_argument("--heldout", type=int, default=1024, help="held-out samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--report", action="store_true", help="print the table, draw --plot")
    p.add_argument("--plot", type=Path, default=PLOT)
    args = p.parse_args()
    try:
        if args.report:
            print(report(args.out, args.plot))
        else:
            run(args)
    except SnapcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
