"""ONNX target: export a Graph to ONNX, simplify it with onnxsim, verify it in onnxruntime.

The artifact folder holds ``model.onnx`` (plus ``model.onnx.data`` when the weights pass the
2 GB protobuf limit), ``manifest.json`` and ``export_log.txt``. Export always verifies: the
onnxruntime CPU output is compared with the PyTorch output of the same graph, and a model
below ``min_psnr_db`` is not written.

A graph with quantization records (``passes/quantize.py``) is exported in fp32, simplified, then
rewritten to QDQ form (``targets/onnx_qdq.py``: quantized weights + DequantizeLinear, uint8
Q/DQ around w8a8 layers; the onnxruntime session config it needs written into the model,
``targets/onnx_session.py``). It is verified, under that config (recorded as
``verification.session_config``), against the fake-quantized torch graph of the records
the rewrite realised (``apply_records_to_module``), not against fp32; the PSNR vs fp32 is
recorded beside it (``verification.vs_fp32``) and the realisation under
``quantization.realised``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from snapc.errors import ToolMissingError, VerificationError
from snapc.graph import Graph
from snapc.manifest import Manifest, versions
from snapc.numerics import compare
from snapc.passes.quantize import NODE_PREFIX, apply_records_to_module, quant_records
from snapc.targets.onnx_qdq import apply_qdq
from snapc.targets.onnx_session import read_config, session_options

__all__ = ["OnnxOptions", "export", "ONNX_PROTOBUF_LIMIT"]

ONNX_PROTOBUF_LIMIT = 2 * 1024**3  # protobuf cannot serialise a single message over 2 GB
MODEL_FILE = "model.onnx"


PACKING_PASSES = ("fuse_qkv", "fuse_attention")  # onnxsim passes that merge weights


@dataclass(frozen=True)
class OnnxOptions:
    """Options of the ONNX target.

    ``min_psnr_db`` is the verification gate against PyTorch (60 dB suits fp32, and weight-only
    quantization, which is checked against the fake-quantized graph: the same weights).
    ``min_psnr_db_w8a8`` is the gate when activations are quantized too: onnxruntime's integer
    kernels round (and saturate) differently from the fake-quantized graph.
    ``simplify`` runs onnxsim; ``opset`` is the ONNX opset to emit. ``separate_weights``
    keeps every weight its own initializer (onnxsim's ``fuse_qkv`` packs q/k/v projections
    into one MatMul, its ``fuse_attention`` into a com.microsoft.Attention); it is forced on
    when the graph has quantization records, which name weights one by one.
    """

    opset: int = 18
    simplify: bool = True
    min_psnr_db: float = 60.0
    min_psnr_db_w8a8: float = 30.0
    threads: int = 0
    separate_weights: bool = False


@contextlib.contextmanager
def _quiet(log: io.StringIO):
    """Capture stdout/stderr and torch.onnx logging into ``log`` while exporting."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_onnx(graph: Graph, path: Path, options: OnnxOptions, log: io.StringIO) -> None:
    from snapc.passes.fused_ops import onnx_translations  # snapc's fused ops -> ORT ops

    with _quiet(log):
        program = torch.onnx.export(
            graph.program, graph.example_inputs, dynamo=True, opset_version=options.opset,
            input_names=list(graph.input_names), output_names=["noise_pred"],
            optimize=True, verbose=False, report=False,
            custom_translation_table=onnx_translations(),
        )
        program.save(str(path), external_data=graph.param_bytes() >= ONNX_PROTOBUF_LIMIT // 2)


def _simplify(path: Path, large: bool, log: io.StringIO, skipped: list[str]
              ) -> dict[str, object]:
    import onnx
    import onnxsim

    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    with _quiet(log):
        if large:
            simplified, ok = onnxsim.simplify(str(path), output_path=str(path),
                                              skipped_optimizers=skipped or None)
        else:
            simplified, ok = onnxsim.simplify(onnx.load(str(path)),
                                              skipped_optimizers=skipped or None)
            if ok:
                onnx.save(simplified, str(path))
    if large:
        _one_data_file(path)
    after = len(onnx.load(str(path), load_external_data=False).graph.node)
    return {"ran": True, "checked": bool(ok), "nodes_before": before, "nodes_after": after,
            "skipped_optimizers": skipped}


def _one_data_file(path: Path) -> None:
    """Store the weights of the ONNX model at ``path`` in ``<name>.data`` beside it and delete
    any other data file: onnxsim writes a large model's weights to a file with a random
    name and leaves the exporter's ``.data`` file behind."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in model.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    wanted = f"{path.name}.data"
    if locations <= {wanted}:
        return
    model = onnx.load(str(path))
    others = [path.parent / name for name in locations | {wanted}]
    for old in others:
        old.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=wanted)


def _run_onnxruntime(path: Path, graph: Graph, threads: int) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(path, threads),
                                   providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(graph.input_names,
                                                        graph.example_inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def export(
    graph: Graph,
    out_dir: Path,
    options: OnnxOptions = OnnxOptions(),
    progress: Callable[[str], None] = lambda _: None,
) -> Manifest:
    """Write the ONNX artifact of ``graph`` into ``out_dir`` (an empty folder) and return its
    manifest. Raises VerificationError when onnxruntime's output misses ``min_psnr_db``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ToolMissingError(f"the onnx target needs onnx and onnxruntime ({exc}); "
                               "pip install snapc") from exc
    out_dir = Path(out_dir)
    path = out_dir / MODEL_FILE
    log = io.StringIO()
    timings: dict[str, float] = {}
    large = graph.param_bytes() >= ONNX_PROTOBUF_LIMIT // 2

    progress("exporting to ONNX")
    start = time.perf_counter()
    _export_onnx(graph, path, options, log)
    timings["export_s"] = time.perf_counter() - start

    simplify = {"ran": False}
    if options.simplify:
        progress("simplifying with onnxsim")
        start = time.perf_counter()
        separate = options.separate_weights or bool(_weight_records(graph))
        simplify = _simplify(path, large, log, list(PACKING_PASSES) if separate else [])
        timings["simplify_s"] = time.perf_counter() - start

    quant: dict[str, object] = {}
    reference_graph, reference_name, gate = graph, "torch (same graph, fp32, CPU)", \
        options.min_psnr_db
    records = _weight_records(graph)
    if records:
        progress(f"rewriting {len(records)} quantized weights to QDQ")
        start = time.perf_counter()
        quant = apply_qdq(path, graph, records)
        timings["qdq_s"] = time.perf_counter() - start
        realised = {k: v for k, v in records.items() if k not in quant["unmatched"]}
        activations = any(r["scheme"] == "w8a8" for r in realised.values())
        reference_graph = apply_records_to_module(graph, realised, activations=activations)
        reference_name = (f"torch fake-quantized graph (the {len(realised)} records realised "
                          "here: weights quantize-dequantized"
                          + (", uint8 activations" if activations else "") + "; fp32, CPU)")
        gate = options.min_psnr_db_w8a8 if activations else options.min_psnr_db

    progress("verifying in onnxruntime")
    start = time.perf_counter()
    reference = reference_graph.example_output
    output = _run_onnxruntime(path, graph, options.threads)
    numerics = compare(reference, output)
    vs_fp32 = compare(graph.example_output, output) if records else None
    timings["verify_s"] = time.perf_counter() - start
    (out_dir / "export_log.txt").write_text(log.getvalue())
    if not numerics.passes(gate):
        raise VerificationError(
            f"onnxruntime output PSNR {numerics.psnr_db:.1f} dB < {gate} dB vs "
            f"{'the fake-quantized ' if records else ''}PyTorch graph (max abs err "
            f"{numerics.max_abs:.3g}); artifact not written")

    files = {"model": MODEL_FILE, "log": "export_log.txt"}
    if (out_dir / f"{MODEL_FILE}.data").exists():
        files["external_data"] = f"{MODEL_FILE}.data"
    manifest = Manifest.for_graph(
        graph, "onnx", files=files, target_options=asdict(options),
        verification={
            "reference": reference_name,
            "runtime": "onnxruntime CPUExecutionProvider",
            "session_config": read_config(path),
            "inputs": "the graph's example inputs",
            "min_psnr_db": gate,
            "passed": True,
            **numerics.to_json(),
            **({"vs_fp32": vs_fp32.to_json()} if vs_fp32 else {}),
        },
        versions=versions("onnx", "onnxruntime", "onnxsim", "diffusers"),
        extra={"onnxsim": simplify, "timings": {k: round(v, 2) for k, v in timings.items()},
               "model_bytes": sum(f.stat().st_size for f in out_dir.glob(f"{MODEL_FILE}*"))},
    )
    if records:
        manifest.quantization["realised"] = {"format": "QDQ (onnx_qdq)", **quant}
    return manifest


def _weight_records(graph: Graph) -> dict[str, dict]:
    """Return the graph's quantization records that change a weight in ONNX (fp32 islands
    and fp32 weights are fp32 here anyway)."""
    return {k: r for k, r in quant_records(graph).items()
            if not k.startswith(NODE_PREFIX) and r["scheme"] != "fp32"}
