"""Quantization schemes side by side: artifact size, UNet-output PSNR, quality, ORT latency.

    flock /tmp/snapc_heavy.lock python bench/quantize.py --model shapes --prompts 100
    flock /tmp/snapc_heavy.lock python bench/quantize.py --model sd15 --no-latency

For each scheme: Quantize records the per-layer decision; the fake-quantized torch graph gives
the PSNR of the UNet output vs fp32 on calibration inputs; the fp32 ONNX artifact is rewritten
with apply_qdq (its size on disk, onnxruntime CPU latency, and its PSNR vs the fake-quant graph).
On ``shapes`` prompt adherence and Fréchet distance come from snapc.quality on ``--prompts``
validation prompts (the full protocol uses 1000 on a GPU). ``mixed`` gets the size budget of an
average of ``--mean-bits`` bits over the quantizable layers. Figures go to the
``## Quantization`` section of bench/RESULTS.md and to bench/out/quantize_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.results import machine, write_section
from snapc.calibration import calibration_inputs
from snapc.compiler import load_graph
from snapc.numerics import compare
from snapc.passes.quantize import Quantize, apply_records_to_module, quant_records
from snapc.passes.quantize_observers import calibration_chunks, quantizable_layers
from snapc.pipeline import PassContext
from snapc.targets.onnx import OnnxOptions, export
from snapc.targets.onnx_qdq import apply_qdq, int8_kernels

SCHEMES = ("fp16", "w8", "w8a8", "w4", "palette6", "palette4", "mixed")
OUT = Path(__file__).resolve().parent / "out"


def _latency_ms(path: Path, graph, runs: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(graph.input_names, graph.example_inputs, strict=True)}
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ort_output(path: Path, graph) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(graph.input_names, graph.example_inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _output_psnr(reference, candidate, chunks) -> float:
    ref_fn, cand_fn = reference.module(), candidate.module()
    with torch.no_grad():
        ref = torch.cat([ref_fn(*c) for c in chunks])
        out = torch.cat([cand_fn(*c) for c in chunks])
    return compare(ref, out).psnr_db


def _on(records: dict, device: str) -> dict:
    """Return ``records`` with their tensors (scales, look-up tables) on ``device``."""
    return {k: {kk: v.to(device) if isinstance(v, torch.Tensor) else v for kk, v in r.items()}
            for k, r in records.items()}


class _Quantized:
    """The fake-quantized UNet at any batch size and device: for each new input shape the
    graph is traced at that batch (``Graph.at_batch``) and the records applied to it again
    (records name weights and nodes, which do not depend on the batch)."""

    def __init__(self, graph, records: dict | None) -> None:
        self.graph, self.records = graph, records
        self._modules: dict[tuple, torch.nn.Module] = {}

    def __call__(self, x, t, context):
        key = (tuple(x.shape), x.device)
        if key not in self._modules:
            traced = self.graph.at_batch((x, t, context))
            if self.records is not None:
                traced = apply_records_to_module(traced, _on(self.records, str(x.device)))
            self._modules[key] = traced.module()
        with torch.no_grad():
            return self._modules[key](x, t, context)


def _quality(graph, records: dict | None, prompts: int, steps: int, device: str
             ) -> dict[str, float]:
    from snapc.quality import evaluate, load_feature_classifier, validation_codes
    from snapc.shapes.model import load_text_encoder

    with torch.no_grad():
        result = evaluate(_Quantized(graph, records), load_text_encoder().to(device),
                          load_feature_classifier().to(device), codes=validation_codes(prompts),
                          steps=steps, device=device)
    return {"adherence": result["adherence"], "exact": result["exact"], "fd": result["fd"]}


def measure(model: str, schemes: list[str], prompts: int, steps: int, calibration: int,
            mean_bits: float, latency_runs: int, device: str = "cpu") -> dict:
    """Return the figures of every scheme as a JSON-able dict (quality sampled on ``device``;
    ONNX export and onnxruntime latency on the CPU)."""
    graph = load_graph(model)
    sampler_graph = load_graph(model, device=device) if prompts else None
    chunks = calibration_chunks(graph, calibration_inputs(graph, calibration, seed=1))
    gm = graph.module()
    layer_elems = sum(gm.get_parameter(f"net.{k}").numel() for k in quantizable_layers(gm))
    layer_keys = {f"net.{k}" for k in quantizable_layers(gm)}
    other = sum(t.numel() * 4 for n, t in graph.program.state_dict.items() if n not in layer_keys)
    size_mb = (layer_elems * mean_bits / 8 + other) / 1e6
    where = machine() + (f"; prompts sampled on {torch.cuda.get_device_name()}"
                         if device == "cuda" else "")
    res: dict = {"model": model, "machine": where, "prompts": prompts, "steps": steps,
                 "mixed_budget_mb": round(size_mb, 3), "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = Path(tmp) / "fp32"
        fp32_dir.mkdir()
        export(graph, fp32_dir, OnnxOptions(separate_weights=True))  # QDQ names weights
        fp32_path = fp32_dir / "model.onnx"
        fp32_bytes = sum(f.stat().st_size for f in fp32_dir.glob("model.onnx*"))  # + .data
        row = {"size_mb": fp32_bytes / 1e6, "psnr_db": None}
        if latency_runs:
            row["ort_ms"] = _latency_ms(fp32_path, graph, latency_runs)
        if prompts:
            row |= _quality(sampler_graph, None, prompts, steps, device)
        res["schemes"]["fp32"] = row
        print("fp32", row, flush=True)
        for scheme in schemes:
            start = time.perf_counter()
            quant = Quantize(scheme, calibration=4, size_mb=size_mb if scheme == "mixed" else None)
            result = quant.run(graph, PassContext())
            records = quant_records(result)
            path = Path(tmp) / scheme / "model.onnx"
            shutil.copytree(fp32_dir, path.parent)  # with external data (sd15 is over 2 GB)
            onnx_records = {k: v for k, v in records.items() if not k.startswith("node:")}
            info = apply_qdq(path, graph, onnx_records)
            fake = apply_records_to_module(graph, records)
            realised = {k: v for k, v in onnx_records.items() if k not in info["unmatched"]}
            fake_onnx = apply_records_to_module(graph, realised, activations=scheme != "fp16")
            row = {"size_mb": info["model_bytes"] / 1e6,
                   "psnr_db": _output_psnr(graph, fake, chunks),
                   "onnx_vs_fake_psnr_db": compare(fake_onnx.run(),
                                                   _ort_output(path, graph)).psnr_db,
                   "unmatched": len(info["unmatched"])}
            if scheme == "w8a8":
                row["int8_kernels"] = int8_kernels(path)
            if scheme == "fp16":
                row["fp32_islands"] = result.info["fp32_islands"]
            if scheme == "mixed":
                mixed = result.info["mixed"]
                row["mean_bits"] = mixed["mean_bits"]
                row["choices"] = {k: v["scheme"] for k, v in mixed["layers"].items()}
            if latency_runs:
                row["ort_ms"] = _latency_ms(path, graph, latency_runs)
            if prompts:
                row |= _quality(sampler_graph, records, prompts, steps, device)
            row["seconds"] = round(time.perf_counter() - start, 1)
            res["schemes"][scheme] = row
            print(scheme, {k: v for k, v in row.items() if k != "choices"}, flush=True)
    return res


def render(res: dict) -> str:
    """Return the markdown body of the results section."""
    lines = [f"`{res['model']}` on {res['machine']}.", "",
             "| scheme | artifact MB | UNet PSNR vs fp32 (dB) | ORT vs fake-quant (dB) | "
             "ORT CPU ms | adherence | FD |", "|---|---|---|---|---|---|---|"]
    for name, row in res["schemes"].items():
        def f(key, fmt="{:.2f}", row=row):
            value = row.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else "-"
        lines.append(f"| {name} | {f('size_mb', '{:.1f}')} | {f('psnr_db', '{:.1f}')} | "
                     f"{f('onnx_vs_fake_psnr_db', '{:.1f}')} | {f('ort_ms', '{:.1f}')} | "
                     f"{f('adherence', '{:.3f}')} | {f('fd', '{:.2f}')} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, write JSON and the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--mean-bits", type=float, default=4.5)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--title", default=None)
    parser.add_argument("--device", default="cpu", help="where prompts are sampled (cuda)")
    args = parser.parse_args()
    torch.manual_seed(0)
    res = measure(args.model, args.schemes, args.prompts if args.model == "shapes" else 0,
                  args.steps, args.calibration, args.mean_bits, args.latency_runs, args.device)
    OUT.mkdir(exist_ok=True)
    (OUT / f"quantize_{args.model}.json").write_text(json.dumps(res, indent=1, default=str))
    write_section(args.title or f"Quantization ({args.model})", render(res))


if __name__ == "__main__":
    main()
