"""ONNX Runtime CPU latency of a UNet: unfused vs snapc's fusions vs onnxruntime's optimizer.

Exports MODEL (default ``sd15``, random weights) to ONNX three ways and times all three in one
run with onnxruntime's CPU execution provider:

  (a) unfused       torch.onnx export of the traced graph
  (b) snapc         the same after ``fusion_passes("all")``, exported with snapc's
                    translations (com.microsoft MultiHeadAttention / QuickGelu / BiasGelu)
  (c) ort-optimizer ``onnxruntime.transformers.optimizer.optimize_model(a, model_type="unet")``
                    with only the fusions whose kernels exist on the CPU provider (NhwcConv,
                    GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and packed QKV/KV
                    MultiHeadAttention have none, so they are off)

Every variant is checked against the PyTorch output (PSNR) before it is timed. Sessions use
full graph optimisation and ``--threads`` intra-op threads; rounds alternate the order
(a, b, c, then c, b, a) and the best time per variant is reported with the median. Results go
to ``bench/RESULTS.md`` (section ``## Fusion``), ``bench/out/fusion_ort.json`` and a PNG.

Run (SD-1.5 needs ~12 GB RAM and ~10 GB disk; one UNet call is seconds on a laptop CPU):
    flock /tmp/snapc_heavy.lock python bench/fusion_ort.py --model sd15 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

from snapc.compiler import load_graph
from snapc.graph import Graph
from snapc.numerics import compare
from snapc.passes.fuse import fusion_passes
from snapc.passes.fused_ops import onnx_translations
from snapc.pipeline import PassContext, Pipeline
from snapc.plots import save_figure

HERE = Path(__file__).resolve().parent
console = Console(stderr=True)
VARIANTS = ("a_unfused", "b_snapc", "c_ort_optimizer")


def export_onnx(graph: Graph, path: Path, fused: bool) -> float:
    """Export ``graph`` to ``path`` (external data next to it); return seconds taken."""
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        graph.program, graph.example_inputs, dynamo=True, opset_version=18,
        input_names=list(graph.input_names), output_names=["noise_pred"], optimize=True,
        verbose=False, report=False,
        custom_translation_table=onnx_translations() if fused else None)
    program.save(str(path), external_data=True)
    return time.perf_counter() - start


def ort_optimize(src: Path, dst: Path, heads: int, hidden: int) -> float:
    """Run onnxruntime's UNet optimizer on ``src`` with CPU-capable fusions; return seconds."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    options = FusionOptions("unet")
    for flag in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm",
                 "enable_bias_splitgelu", "enable_packed_qkv", "enable_packed_kv",
                 "enable_bias_add"):
        setattr(options, flag, False)  # no CPU kernel for these contrib ops (onnxruntime 1.32)
    model = optimize_model(str(src), model_type="unet", num_heads=heads, hidden_size=hidden,
                           optimization_options=options, opt_level=0, use_gpu=False,
                           only_onnxruntime=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=True)
    return time.perf_counter() - start


def op_counts(path: Path) -> dict[str, int]:
    """Return {op type: count} of the ONNX file (domain-qualified for contrib ops)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}"
                        for n in model.graph.node).most_common())


def time_variant(path: Path, inputs: tuple[torch.Tensor, ...], reference: torch.Tensor,
                 threads: int, repeats: int) -> dict[str, object]:
    """Load ``path`` in onnxruntime (CPU), check it against ``reference``, time ``repeats``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    output = session.run(None, feeds)[0]  # warm-up, also the correctness check
    numerics = compare(reference, torch.from_numpy(output))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    del session
    gc.collect()
    return {"load_s": load_s, "times_s": times, "psnr_db": numerics.psnr_db,
            "max_abs": numerics.max_abs}


def _heads_hidden(graph: Graph) -> tuple[int, int]:
    config = graph.source.config or {}
    heads = config.get("attention_head_dim", 8)
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    return int(heads), int(config.get("block_out_channels", [320])[0])


def write_results(result: dict, out_md: Path) -> None:
    """Replace (or append) the ``## Fusion`` section of ``out_md`` with ``result``."""
    lat = result["latency"]
    base = min(lat["a_unfused"]["times_s"])
    lines = ["## Fusion", "",
             f"`python bench/fusion_ort.py --model {result['model']} --threads "
             f"{result['threads']}` on {result['machine']} ({result['date']}); "
             f"onnxruntime {result['versions']['onnxruntime']} CPU EP, "
             f"{result['threads']} intra-op threads, ORT_ENABLE_ALL, "
             f"{result['rounds']} rounds x {result['repeats']} runs after a warm-up, "
             "rounds in alternating order; other jobs shared the CPU, so compare columns, "
             "not absolute values.", "",
             "| variant | best s | median s | vs (a) | PSNR vs torch dB | ONNX nodes |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        times = lat[name]["times_s"]
        lines.append(f"| {name} | {min(times):.2f} | {statistics.median(times):.2f} | "
                     f"{base / min(times):.2f}x | {lat[name]['psnr_db']:.1f} | "
                     f"{sum(result['op_counts'][name].values())} |")
    lines += ["", "snapc fusion counts: " + ", ".join(
        f"{k} {v}" for k, v in result["fusion_counts"].items()), ""]
    ops = sorted({op for counts in result["op_counts"].values() for op in counts})
    lines += ["| op type | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(str(result["op_counts"][v].get(op, 0))
                                               for v in VARIANTS) + " |")
    lines.append("")
    section = "\n".join(lines)
    text = out_md.read_text() if out_md.exists() else "# snapc benchmark results\n\n"
    start = text.find("## Fusion\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out_md.write_text(text)


def plot(result: dict, path: Path) -> None:
    """Save a bar chart of best latency per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [min(result["latency"][v]["times_s"]) for v in VARIANTS]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(VARIANTS), best, color=["#999999", "#1f77b4", "#ff7f0e"])
    ax.set_xlabel("onnxruntime CPU latency per UNet call (s, best)")
    ax.set_title(f"{result['model']}: {result['threads']} threads")
    ax.invert_yaxis()
    save_figure(fig, path)


def main() -> None:
    """Parse arguments; run the prepare and time phases in separate processes.

    Each phase is its own process so the timing process holds one onnxruntime session and
    nothing else (SD-1.5 in torch, its fused copy and three ONNX protobufs do not fit beside
    a 3.4 GB session in 24 GB)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/snapc_fusion_ort"))
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--reuse", action="store_true", help="reuse ONNX files in --work")
    parser.add_argument("--phase", choices=("all", "prepare", "time"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase == "all":
        for phase in ("prepare", "time"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", phase],
                           check=True)
        return
    if args.phase == "prepare":
        prepare(args)
    else:
        time_all(args)


def prepare(args: argparse.Namespace) -> None:
    """Trace, fuse and export the three variants; save inputs, reference and counts."""
    paths = {v: args.work / v / "model.onnx" for v in VARIANTS}
    console.print(f"[bold]load + trace {args.model}")
    graph = load_graph(args.model, latent=args.latent)
    reference = graph.run()
    heads, hidden = _heads_hidden(graph)
    timings: dict[str, float] = {}
    if not (args.reuse and paths["a_unfused"].exists()):
        console.print("(a) export unfused")
        timings["export_a_s"] = export_onnx(graph, paths["a_unfused"], fused=False)
    console.print("(b) snapc fusions")
    start = time.perf_counter()
    result = Pipeline(fusion_passes("all")).run(graph, PassContext(check=False))
    timings["fusion_passes_s"] = time.perf_counter() - start
    fused = result.graph
    fusion_counts = dict(Counter(c.rule for c in result.changes))
    fused_numerics = compare(reference, fused.run())
    del graph
    gc.collect()
    if not (args.reuse and paths["b_snapc"].exists()):
        timings["export_b_s"] = export_onnx(fused, paths["b_snapc"], fused=True)
    if not (args.reuse and paths["c_ort_optimizer"].exists()):
        console.print("(c) onnxruntime optimize_model(model_type='unet')")
        timings["ort_optimize_s"] = ort_optimize(paths["a_unfused"], paths["c_ort_optimizer"],
                                                 heads, hidden)
    torch.save({"inputs": fused.example_inputs, "reference": reference,
                "fusion_counts": fusion_counts, "fused_psnr": fused_numerics.psnr_db,
                "timings": timings}, args.work / "prepared.pt")


def time_all(args: argparse.Namespace) -> None:
    """Time the three ONNX files in alternating rounds and write the results."""
    import onnxruntime

    paths = {v: args.work / v / "model.onnx" for v in VARIANTS}
    saved = torch.load(args.work / "prepared.pt")
    reference, inputs = saved["reference"], saved["inputs"]
    fusion_counts, timings = saved["fusion_counts"], saved["timings"]
    latency = {v: {"times_s": []} for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name in order:
            console.print(f"round {r + 1}: time {name}")
            got = time_variant(paths[name], inputs, reference, args.threads, args.repeats)
            latency[name]["times_s"] += got["times_s"]
            latency[name].update({k: v for k, v in got.items() if k != "times_s"})
            console.print(f"  best {min(got['times_s']):.2f} s, PSNR {got['psnr_db']:.1f} dB")
    out = {
        "model": args.model, "threads": args.threads, "repeats": args.repeats,
        "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                   f"torch threads, {_cpu_name()}",
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "fusion_counts": fusion_counts, "fused_psnr_vs_torch_db": saved["fused_psnr"],
        "timings": timings, "latency": latency,
        "op_counts": {v: op_counts(paths[v]) for v in VARIANTS},
    }
    (HERE / "out").mkdir(exist_ok=True)
    stem = f"fusion_ort_{args.model}"
    (HERE / "out" / f"{stem}.json").write_text(json.dumps(out, indent=2))
    plot(out, HERE / "out" / f"{stem}.png")
    if args.model == "sd15" or args.results != HERE / "RESULTS.md":
        write_results(out, args.results)
    console.print_json(json.dumps({k: out[k] for k in ("fusion_counts", "timings")}))
    for v in VARIANTS:
        console.print(f"{v}: best {min(latency[v]['times_s']):.2f} s")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
