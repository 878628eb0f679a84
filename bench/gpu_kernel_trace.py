"""Which CUDA kernels does each block run, and for how long? (torch.profiler, one GPU)

The cost model predicts per FX node; on a GPU the time goes to kernels that cuDNN and cuBLAS
pick per shape (layout copies around convs, split-K GEMMs, attention tiles). This script cuts
the named blocks out of the FX graph (``snapc.profile_blocks``), runs each in eager mode under
``torch.profiler`` and prints, per block, the GPU time of every kernel name (mean per call),
so the cost model's misses can be traced to kernels. Figures in ``bench/RESULTS.md`` ("What the
model misses on the H100") come from this run:

    python3 bench/gpu_kernel_trace.py --model sd15 --latent 64

Writes ``bench/out/gpu_kernel_trace_<model>.json`` (``..._<model>_all.json`` with
``--blocks all``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from snapc.compiler import load_graph
from snapc.profile_blocks import isolate_blocks

OUT = Path(__file__).resolve().parent / "out"
DEFAULT_BLOCKS = ("down_blocks.0.attentions.0", "down_blocks.1.attentions.0",
                  "down_blocks.2.attentions.0", "mid_block.attentions.0",
                  "down_blocks.1.resnets.1", "up_blocks.1.resnets.0")


def kernel_times(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                 calls: int) -> dict[str, list[float]]:
    """Return ``{kernel name: [launches per call, GPU us per call]}`` for ``module(*inputs)``,
    averaged over ``calls`` profiled calls after five warm-up calls."""
    with torch.inference_mode():
        for _ in range(5):
            module(*inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(calls):
                module(*inputs)
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in trace.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, [0.0, 0.0])
        entry[0] += 1 / calls
        entry[1] += event.device_time / calls
    return dict(sorted(kernels.items(), key=lambda item: -item[1][1]))


def main(argv: list[str] | None = None) -> None:
    """Trace the blocks; print a per-block kernel table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--blocks", nargs="+", default=list(DEFAULT_BLOCKS),
                        help="block names, or 'all'")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels printed per block")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (torch.cuda.is_available() is False)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    graph = load_graph(args.model, latent=args.latent, device="cuda")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": args.model, "latent": args.latent, "blocks": {}}
    print(f"{report['gpu']}, torch {report['torch']}, {args.model} at {args.latent}x"
          f"{args.latent}, fp32, batch 1")
    every = args.blocks == ["all"]
    names = [b.name for b in graph.blocks] if every else args.blocks
    for item in isolate_blocks(graph, names):
        inputs = tuple(t.cuda() for t in item.inputs)
        kernels = kernel_times(item.module, inputs, args.calls)
        total = sum(us for _, us in kernels.values())
        launches = sum(n for n, _ in kernels.values())
        report["blocks"][item.name] = {"gpu_us": round(total, 1),
                                       "kernels_per_call": round(launches),
                                       "kernels": {k: [round(n, 2), round(us, 1)]
                                                   for k, (n, us) in kernels.items()}}
        print(f"== {item.name}: {launches:.0f} kernels, {total / 1e3:.3f} ms GPU time")
        for name, (count, us) in list(kernels.items())[:args.top]:
            print(f"   {us:8.1f} us  x{count:4.1f}  {name[:100]}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"gpu_kernel_trace_{args.model}{'_all' if every else ''}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
