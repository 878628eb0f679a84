"""Recovery distillation on `shapes`: snapc's search pick vs random sets vs BK-SDM-Small.

For each budget (a fraction of the predicted ``iphone14pro-ane`` latency) and method, the
removed set is scored as removed and after the same minutes of recovery distillation (1000
validation prompts, 25 DDIM steps, CFG 3). Rows are appended to ``bench/out/recovery.json``
as each finishes, so a run split over sessions resumes where it stopped (rows already there
are skipped)::

    python bench/recovery.py --budgets 0.5 --methods snapc bk-sdm-small --minutes 2.5
    python bench/recovery.py --budgets 0.3 0.5 0.7 --methods random --minutes 2.5
    python bench/recovery.py --plot            # table + PNG for bench/RESULTS.md

On another GPU than the earlier rows, bound recovery by steps, not minutes, and rerun the
baseline there under the same label (a ``--variant`` row sits beside the plain one)::

    python bench/recovery.py --budgets 0.3 --methods snapc --minutes 10 --steps 2574 \
        --variant steps-2574
    python bench/recovery.py --budgets 0.3 --methods random --random-seeds 2 --minutes 10 \
        --steps 2574 --variant steps-2574

Methods: ``snapc`` (snapc distill's own flow: block search with the full metric, optionally
after robust training, then recovery), ``random`` (3 seeded random sets meeting the budget),
``bk-sdm-small`` (BK-SDM-Small's rule, at its own budget). ``--save NAME=DIR`` keeps a
recovered folder (e.g. ``snapc@0.5=out/shapes-small``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapc.artifacts import atomic_output_file  # noqa: E402

OUT = REPO / "bench" / "out" / "recovery.json"
DEVICE = "iphone14pro-ane"
# BK-SDM-Small on the shapes layout: the second ResNet (+ attention) of every down stage, the
# middle one of every up stage, and the whole mid block (13 blocks).
BK_SDM_SMALL = (
    "down_blocks.0.resnets.1", "down_blocks.1.resnets.1", "down_blocks.1.attentions.1",
    "down_blocks.2.resnets.1", "down_blocks.2.attentions.1",
    "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.1", "up_blocks.0.attentions.1", "up_blocks.1.resnets.1",
    "up_blocks.1.attentions.1", "up_blocks.2.resnets.1",
)


def _load_rows() -> list[dict]:
    return json.loads(OUT.read_text())["rows"] if OUT.is_file() else []


def _write_rows(rows: list[dict]) -> None:
    """Write the rows atomically; ``machines`` lists the GPUs of the rows (each names its own)."""
    machines = sorted({r["machine"] for r in rows})
    with atomic_output_file(OUT) as tmp:
        tmp.write_text(json.dumps({"machines": machines, "rows": rows}, indent=1) + "\n")


def _random_set(graph, cost, budget: float, seed: int) -> list[str]:
    """Return blocks in a seeded random order, added until the predicted latency fits."""
    from snapc.train.screening import random_sets

    found = random_sets(graph, cost, budget * cost.estimate_graph(graph).total_ms, [seed])
    if not found:
        raise SystemExit(f"budget {budget} cannot be met")
    return list(found[0].removed)


def _evaluate(unet, device: str, prompts: int) -> dict:
    from snapc.quality import evaluate, load_feature_classifier, validation_codes
    from snapc.shapes.model import load_text_encoder

    codes = validation_codes(prompts)
    scores = evaluate(unet.to(device).eval(), load_text_encoder().to(device),
                      load_feature_classifier().to(device), codes=codes, device=device)
    return {"adherence": scores["adherence"], "fd": scores["fd"]}


def _recover(key: str, removed: list[str] | None, budget: float | None, args) -> tuple:
    """Run snapc distill's flow; return (folder, record)."""
    from snapc.train import (
        RecoveryLoss,
        RecoveryOptions,
        RobustOptions,
        TrainOptions,
        distill_recovery,
    )

    folder = REPO / "bench" / "out" / "recovery" / key.replace("@", "_")
    robust = RobustOptions(minutes=args.robust_minutes) if budget is not None and \
        args.robust_minutes else RobustOptions()
    options = RecoveryOptions(model="shapes", out=folder, remove=tuple(removed or ()),
                              device=DEVICE if removed is None else None,
                              budget=budget if removed is None else None, force=True,
                              robust=robust, name=key, search_prompts=args.search_prompts,
                              screen=args.screen if removed is None else 0,
                              screen_minutes=args.screen_minutes if args.screen else None)
    train = TrainOptions(minutes=args.minutes, steps=args.steps, batch=args.batch, lr=args.lr,
                         warmup=100, ema=0.995, seed=0, device=args.device,
                         checkpoint_every=10_000, log_every=50)
    record = distill_recovery(options, train, RecoveryLoss(feature_kd=args.feature_kd),
                              report=lambda m: print(f"  {m}", flush=True))
    return folder, record


def run(args) -> None:
    from snapc.compiler import load_graph
    from snapc.cost import CostModel
    from snapc.pruned import load_pruned_unet, skip_blocks
    from snapc.shapes.model import load_unet
    from snapc.train.screening import predicted_latency

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = _load_rows()
    done = {(r["budget"], r["method"], r.get("seed"), r.get("variant", "")) for r in rows}
    graph = load_graph("shapes")
    cost = CostModel(DEVICE, dtype="fp16")
    original_ms = cost.estimate_graph(graph).total_ms
    saves = dict(s.split("=", 1) for s in args.save)
    jobs = []
    for budget in args.budgets:
        for method in args.methods:
            if method == "random":
                seeds = args.random_seeds if args.random_seeds else range(args.random_sets)
                jobs += [(budget, method, seed) for seed in seeds]
            elif method == "bk-sdm-small":
                bk_ms = predicted_latency(graph, cost, list(BK_SDM_SMALL))
                jobs.append((round(bk_ms / original_ms, 3), method, None))
            else:
                jobs.append((budget, method, None))
    for budget, method, seed in dict.fromkeys(jobs):
        if (budget, method, seed, args.variant) in done:
            print(f"skip {method} @ {budget} (seed {seed}, variant {args.variant!r}): "
                  f"in {OUT.name}", flush=True)
            continue
        key = (f"{method}@{budget}" + (f"-{seed}" if seed is not None else "")
               + (f"-{args.variant}" if args.variant else ""))
        print(f"== {key}", flush=True)
        start = time.perf_counter()
        if method == "snapc":
            folder, record = _recover(key, None, budget, args)
            removed = record["removed_blocks"]
        else:
            removed = (list(BK_SDM_SMALL) if method == "bk-sdm-small"
                       else _random_set(graph, cost, budget, seed))
            folder, record = _recover(key, removed, None, args)
        screening = ((record.get("search") or {}).get("screening") or {}).get("candidates", [])
        before = _evaluate(skip_blocks(load_unet(), removed), args.device, args.prompts)
        after = _evaluate(load_pruned_unet(folder), args.device, args.prompts)
        row = {"budget": budget, "method": method, "seed": seed, "variant": args.variant,
               "latency_ms": round(predicted_latency(graph, cost, removed), 3),
               "original_ms": round(original_ms, 3), "blocks_removed": len(removed),
               "removed": removed, "adherence_before": before["adherence"],
               "fd_before": before["fd"], "adherence": after["adherence"], "fd": after["fd"],
               "gpu_minutes": round(record["train_seconds"] / 60, 2),
               "robust_minutes": args.robust_minutes if method == "snapc" else 0.0,
               "screen_minutes": round(sum(c["seconds"] for c in screening) / 60, 2),
               "screening": screening,
               "search_seconds": (record.get("search") or {}).get("seconds"),
               "steps": record["steps"], "wall_seconds": round(time.perf_counter() - start, 1),
               "prompts": args.prompts, "machine": machine}
        rows.append(row)
        _write_rows(rows)
        print(json.dumps({k: v for k, v in row.items() if k != "removed"}), flush=True)
        if key in saves:
            import shutil

            shutil.copytree(folder, saves[key], dirs_exist_ok=True)


def plot(path: Path) -> str:
    """Draw adherence vs predicted latency before and after recovery; return a markdown table."""
    import matplotlib.pyplot as plt

    from snapc.plots import save_figure

    rows = sorted(_load_rows(), key=lambda r: (r["budget"], r["method"], r.get("seed") or 0,
                                               r.get("variant", "")))
    colours = {"snapc": "tab:red", "random": "tab:gray", "bk-sdm-small": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, colour in colours.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        x = [r["latency_ms"] for r in mine]
        ax.scatter(x, [r["adherence_before"] for r in mine], facecolors="none",
                   edgecolors=colour, label=f"{method}, as removed")
        ax.scatter(x, [r["adherence"] for r in mine], color=colour,
                   label=f"{method}, recovered")
    if rows:
        ax.axvline(rows[0]["original_ms"], color="k", lw=0.5, ls=":")
        ax.axhline(0.934, color="k", lw=0.5, ls="--", label="shapes (0.934)")
    ax.set_xlabel("predicted iphone14pro-ane latency (ms, fp16)")
    ax.set_ylabel("prompt adherence (1000 prompts)")
    ax.set_title("Block removal on shapes: before and after recovery distillation")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    lines = ["| budget | method | latency ms | blocks | as removed | recovered | FD | "
             "GPU-min (robust) | steps | search s | GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        method = (r["method"] + (f" #{r['seed']}" if r.get("seed") is not None else "")
                  + (f" ({r['variant']})" if r.get("variant") else ""))
        search = f"{r['search_seconds']:.0f}" if r.get("search_seconds") else "-"
        lines.append(f"| {r['budget']} | {method} | {r['latency_ms']:.2f} | "
                     f"{r['blocks_removed']} | {r['adherence_before']:.3f} | "
                     f"**{r['adherence']:.3f}** | {r['fd']:.1f} | {r['gpu_minutes']:.1f} "
                     f"({r.get('robust_minutes', 0):.1f}) | {r['steps']} | {search} | "
                     f"{r['machine'].replace('NVIDIA ', '').split(' ')[0]} |")
    return "\n".join(lines) + _screening_table(rows)


def _screening_table(rows: list[dict]) -> str:
    """For each screened snapc row: every candidate's screening score beside its adherence
    after the full recovery (the snapc row for the search's pick, the ``random`` row of the
    same seed and set for ``random-k``), and the Spearman rank correlation of the two."""
    from snapc.quality import spearman

    out = []
    for r in (r for r in rows if r["method"] == "snapc" and r.get("screening")):
        pairs = []
        for c in r["screening"]:
            if c["origin"] == "search":
                full = r
            else:
                seed = int(c["origin"].split("-")[1])
                full = next((x for x in rows if x["method"] == "random" and x["budget"]
                             == r["budget"] and x.get("seed") == seed and
                             sorted(x["removed"]) == sorted(c["removed"])), None)
            pairs.append((c["origin"], 1 - c["score"], full and full["adherence"]))
        lines = [f"\n\nScreening at budget {r['budget']} (adherence after "
                 f"{r['screen_minutes'] / len(pairs):.1f} GPU-min vs after the full recovery):"
                 "\n", "| candidate | screened | fully recovered |", "|---|---|---|"]
        lines += [f"| {o} | {a:.3f} | {'-' if b is None else f'{b:.3f}'} |" for o, a, b in pairs]
        known = [(a, b) for _, a, b in pairs if b is not None]
        if len(known) >= 3:
            rho = spearman([a for a, _ in known], [b for _, b in known])
            lines.append(f"\nSpearman rank correlation over {len(known)} sets: {rho:+.2f}")
        else:
            lines.append(f"\n({len(known)} of {len(pairs)} candidates fully recovered so far: "
                         "run `--methods random` at this budget for the rest)")
        out.append("\n".join(lines))
    return "".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    p.add_argument("--methods", nargs="*", default=["snapc", "random", "bk-sdm-small"])
    p.add_argument("--random-sets", type=int, default=3)
    p.add_argument("--random-seeds", type=int, nargs="*", default=[],
                   help="run only these random sets (seeds), e.g. to rerun one under a variant")
    p.add_argument("--minutes", type=float, default=2.5, help="recovery minutes per model")
    p.add_argument("--steps", type=int, default=None,
                   help="also stop recovery after N steps (whichever bound comes first)")
    p.add_argument("--variant", default="",
                   help="label a protocol variant: its rows sit beside, not replace, the others")
    p.add_argument("--robust-minutes", type=float, default=0.0)
    p.add_argument("--screen", type=int, default=0,
                   help="snapc: random sets screened beside the search pick")
    p.add_argument("--screen-minutes", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--feature-kd", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--search-prompts", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", nargs="*", default=[], help="KEY=DIR: keep a recovered folder")
    p.add_argument("--plot", action="store_true",
                   help="print the table and draw bench/recovery_front.png from the rows")
    args = p.parse_args()
    if args.plot:
        print(plot(REPO / "bench" / "recovery_front.png"))
        return
    run(args)


if __name__ == "__main__":
    main()
