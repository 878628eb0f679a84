"""Block search vs BK-SDM's fixed rule vs random removals, judged by the full quality metric.

Part 1 (`--part phone`, on the trained `shapes` model): search for the predicted latency of
BK-SDM-Small's removal set (layers_per_block 2 -> 1 and the mid block removed) on
`iphone14pro-ane`, draw 5 random removal sets down to the same latency, and score all of them
with prompt adherence and Fréchet distance (25 DDIM steps, CFG), plus the unpruned model.
Part 2 (`--part cpu`): the same search on `local-cpu` with a measured latency table, then time
the original and the chosen model on this CPU: measured speed-up vs predicted.
Part 3 (`--part sd15`): search time for SD-1.5 (random weights, proxy metric, 64x64, 8
calibration triples) over the whole front, on `--eval-device cuda` where there is a GPU.

Run: python bench/block_search.py --part phone --eval-device cuda --prompts 1000
Writes its figures to bench/RESULTS.md ("Block search") and PNG fronts to bench/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from results import machine, write_section

HERE = Path(__file__).resolve().parent


def bk_sdm_small(graph) -> list[str]:
    """Return BK-SDM-Small's removal set: the second ResNet (+ attention) of every down stage,
    the middle one of every up stage, and the whole mid block."""
    names = []
    for block in graph.blocks:
        parts = block.name.split(".")
        if block.name.startswith("mid_block"):
            names.append(block.name)
        elif parts[0] == "down_blocks" and parts[3] == "1":
            names.append(block.name)
        elif parts[0] == "up_blocks" and parts[3] == "1":
            names.append(block.name)
    return names


def latency_of(cost, graph, removed) -> float:
    """Return the predicted latency of ``graph`` with ``removed`` blocks gone."""
    total = cost.estimate_graph(graph).total_ms
    return total - sum(cost.saving_ms(graph, name) for name in removed)


def random_sets(graph, cost, target_ms: float, count: int, seed: int) -> list[list[str]]:
    """Return ``count`` random removal orders cut where predicted latency reaches target."""
    rng = random.Random(seed)
    names = [b.name for b in graph.blocks if b.removable]
    saving = {n: cost.saving_ms(graph, n) for n in names}
    total = cost.estimate_graph(graph).total_ms
    sets = []
    for _ in range(count):
        order = names[:]
        rng.shuffle(order)
        chosen, latency = [], total
        for name in order:
            if latency <= target_ms:
                break
            chosen.append(name)
            latency -= saving[name]
        sets.append(chosen)
    return sets


def full_metric(graph, removed, prompts: int, device: str) -> dict[str, float]:
    """Return prompt adherence and FD of ``graph`` without ``removed`` (25 steps, CFG)."""
    from snapc.passes import RemoveBlocks
    from snapc.pipeline import PassContext
    from snapc.quality import evaluate, load_feature_classifier, validation_codes
    from snapc.runtime import GraphFunction
    from snapc.shapes.model import load_text_encoder

    pruned = RemoveBlocks(removed).run(graph, PassContext(check=False)).graph if removed else graph
    unet = GraphFunction(pruned)
    classifier = load_feature_classifier().to(device)
    result = evaluate(unet, load_text_encoder().to(device), classifier,
                      codes=validation_codes(prompts), device=device)
    return {"adherence": result["adherence"], "fd": result["fd"]}


def part_phone(args) -> str:
    """Search vs BK-SDM vs random on iphone14pro-ane; return the RESULTS.md text."""
    from snapc.compiler import load_graph
    from snapc.cost import CostModel
    from snapc.passes.search import search_blocks
    from snapc.search_report import plot_front

    graph = load_graph("shapes", device=args.eval_device)
    cost = CostModel("iphone14pro-ane", dtype="fp16")
    bk = bk_sdm_small(graph)
    target = latency_of(cost, graph, bk)
    searches, seconds = {}, {}
    for space in ("eps", "x0"):
        start = time.perf_counter()
        searches[space] = search_blocks(graph, cost, budget_ms=target,
                                        calibration=args.calibration,
                                        eval_device=args.eval_device, space=space)
        seconds[space] = time.perf_counter() - start
    from snapc.search_metrics import AdherenceLoss

    start = time.perf_counter()
    full = AdherenceLoss(graph, prompts=args.search_prompts, steps=10, device=args.eval_device)
    searches["full"] = search_blocks(graph, cost, budget_ms=target, metric=full)
    seconds["full"] = time.perf_counter() - start
    record = searches["full"]
    search_s = seconds["full"]
    variants = {"original": [], "snapc search (full metric)": searches["full"]["chosen"],
                "snapc search (x0 proxy)": searches["x0"]["chosen"],
                "snapc search (eps proxy)": searches["eps"]["chosen"], "BK-SDM-Small rule": bk}
    for i, chosen in enumerate(random_sets(graph, cost, target, 5, args.seed)):
        variants[f"random {i + 1}"] = chosen
    rows, scores = [], {}
    for label, removed in variants.items():
        metric = full_metric(graph, removed, args.prompts, args.eval_device)
        scores[label] = metric
        rows.append(f"| {label} | {len(removed)} | {latency_of(cost, graph, removed):.3f} | "
                    f"{metric['adherence']:.3f} | {metric['fd']:.2f} |")
        print(rows[-1], flush=True)
    randoms = [v for k, v in scores.items() if k.startswith("random")]
    best_random = max(randoms, key=lambda m: m["adherence"])
    plot_front({f"snapc search ({k})": v for k, v in searches.items() if k == "full"},
               HERE / "block_search_front.png")
    plot_front({f"snapc search ({k} proxy)": v for k, v in searches.items() if k != "full"},
               HERE / "block_search_front_proxy.png")
    (HERE / "block_search_record.json").write_text(json.dumps(searches, indent=2))
    ours = scores["snapc search (full metric)"]
    bk_score = scores["BK-SDM-Small rule"]
    return f"""### `shapes` on iphone14pro-ane (predicted fp16 latency), full metric

Budget = BK-SDM-Small's predicted latency, {target:.3f} ms of {record['original_ms']:.3f} ms.
Searches, all greedy with re-scoring on {args.eval_device}: the full metric (1 - prompt
adherence over {args.search_prompts} other prompts, 10 DDIM steps, CFG 3, sampled through the
bypass evaluator) took {search_s:.1f} s; the proxies (NMSE of the noise prediction, or of the
clipped x0 prediction, over {args.calibration} calibration triples) {seconds['eps']:.1f} s and
{seconds['x0']:.1f} s. Final scoring:
{args.prompts} validation prompts, 25 DDIM steps, CFG 3.

| model | blocks removed | predicted ms | prompt adherence | Fréchet distance |
|---|---|---|---|---|
{chr(10).join(rows)}

snapc's choice (full metric): {', '.join(record['chosen'])}.
snapc (full metric) vs BK-SDM: adherence {ours['adherence'] - bk_score['adherence']:+.3f},
FD {ours['fd'] - bk_score['fd']:+.2f}; vs the best random: adherence
{ours['adherence'] - best_random['adherence']:+.3f}, FD {ours['fd'] - best_random['fd']:+.2f}.
Fronts: `bench/block_search_front.png` (full metric), `bench/block_search_front_proxy.png`.
"""


def _median_ms(fn, repeats: int) -> float:
    """Return the median thread CPU time of ``fn`` in ms (one torch thread: steady even when
    other processes share the machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3


def part_cpu(args) -> str:
    """Search on local-cpu with a measured table; time original vs chosen on this CPU."""
    from snapc.compiler import load_graph
    from snapc.cost import CostModel
    from snapc.passes import RemoveBlocks
    from snapc.passes.search import search_blocks
    from snapc.pipeline import PassContext
    from snapc.profile import ProfileOptions, profile_graph

    torch.set_num_threads(1)
    graph = load_graph("shapes", batch=args.cpu_batch)
    table = profile_graph(graph, ProfileOptions(backend="torch", device="cpu",
                                                repeats=args.repeats, threads=1, clock="cpu"))
    cost = CostModel("local-cpu", table=table, dtype="fp32")
    record = search_blocks(graph, cost, budget=args.budget, calibration=args.calibration,
                           space="x0")
    pruned = RemoveBlocks(record["chosen"]).run(graph, PassContext()).graph
    original_fn, pruned_fn = graph.module(), pruned.module()
    inputs = graph.example_inputs
    rounds = []
    for _ in range(3):  # interleave to share drift between both
        with torch.inference_mode():
            rounds.append((_median_ms(lambda: original_fn(*inputs), args.repeats),
                           _median_ms(lambda: pruned_fn(*inputs), args.repeats)))
    original_ms = statistics.median(r[0] for r in rounds)
    pruned_ms = statistics.median(r[1] for r in rounds)
    predicted = record["original_ms"] - record["final_ms"]
    measured = original_ms - pruned_ms
    error = abs(measured - predicted) / max(measured, 1e-9)
    return f"""### `shapes` on local-cpu (measured table)

Batch {args.cpu_batch}, one torch thread, thread CPU time (steady on a shared machine).

Table: `snapc.profile` torch backend, {args.repeats} repeats. Budget {args.budget} of the
original. Chosen: {', '.join(record['chosen'])}.

| | predicted ms | measured ms |
|---|---|---|
| original | {record['original_ms']:.2f} | {original_ms:.2f} |
| chosen | {record['final_ms']:.2f} | {pruned_ms:.2f} |
| saving | {predicted:.2f} | {measured:.2f} |

Measured saving vs predicted: {100 * error:.1f}% apart (goal: within 10%).
"""


def part_sd15(args) -> str:
    """Time the whole-front proxy search on SD-1.5; return the RESULTS.md text."""
    from snapc.compiler import load_graph
    from snapc.cost import CostModel
    from snapc.passes.search import search_blocks

    start = time.perf_counter()
    graph = load_graph("sd15", device=args.eval_device)
    load_s = time.perf_counter() - start
    cost = CostModel("iphone14pro-ane", dtype="fp16")
    record = search_blocks(graph, cost, calibration=8, eval_device=args.eval_device)
    device = (torch.cuda.get_device_name() if args.eval_device == "cuda" else "CPU")
    return f"""### `sd15` whole front (random weights, proxy, 64x64, 8 calibration triples)

{device}: load + trace {load_s:.1f} s; search over the whole front (all
{len(record['chosen'])} removable blocks, re-scoring after each) **{record['seconds']:.1f} s**
with {record['evaluations']} candidate evaluations (SnapFusion: ~2.5 A100 GPU-hours per
action). Predicted {record['original_ms']:.1f} ms -> {record['final_ms']:.1f} ms on
iphone14pro-ane.
"""


def main() -> None:
    """Run the chosen parts and write bench/RESULTS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["phone", "cpu", "sd15"], nargs="+",
                        default=["phone", "cpu"])
    parser.add_argument("--eval-device", default="cpu")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--search-prompts", type=int, default=100)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = {"phone": part_phone, "cpu": part_cpu, "sd15": part_sd15}
    where = machine()
    if args.eval_device == "cuda":
        where += f"; GPU {torch.cuda.get_device_name()}"
    for part in args.part:
        text = parts[part](args)
        print(text, flush=True)
        write_section(f"Block search ({part})", f"Machine: {where}.\n\n{text}")


if __name__ == "__main__":
    main()
