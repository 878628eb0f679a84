"""Core ML target: an ANE-friendly fp16 mlprogram of the graph, chunked and palettized on
request, with an ANE report, verified before it is written.

First ``pipeline(options)`` puts attention into the Neural Engine layout (Apple's
SPLIT_EINSUM_V2 form, ``passes/ane_layout.py``; ``attention="original"`` keeps it as traced).
Conversion follows Apple's ml-stable-diffusion recipe: ``torch.jit.trace`` (default) or
``torch.export`` (``frontend="export"``), coremltools ``mlprogram``, fp16 compute, static
shapes, minimum deployment target iOS 17, compute units CPU_AND_NE. The traced module is the
graph's program unflattened back into its module tree, so every MIL op keeps the layer it came
from for the ANE report. Then:

1. the ANE report lists what will not run on the Neural Engine (``ane_report.json``);
2. quantization records (per layer) and ``palettize=n`` go through ``coremltools.optimize.coreml``
   (``targets/coreml_quant.py``). The graph's own records (``passes/quantize.py``) are realised
   exactly: the converted graph is the fake-quantized one (``apply_records_to_module``, weights
   only), its palettes come from the weights' unique values, and it is the verification
   reference (the PSNR vs fp32 is recorded as ``verification.vs_fp32``);
3. a model with more than ``max_chunk_bytes`` of weights (or ``chunks >= 2``) is split into
   chained mlpackages (``targets/coreml_chunk.py``), and the chain must reproduce the whole
   program exactly: the interpreter runs the whole converted program once, keeping the value
   of every chunk boundary, and every output of every chunk in the chain run must equal it bit
   for bit (two interpreter passes in all: the whole program, and the chain that step 4 runs);
4. verification: on macOS, Core ML prediction; elsewhere the numpy MIL interpreter
   (``targets/coreml_mil_interp.py``) runs the written packages. The output is compared with
   PyTorch on the graph's example inputs (the output of ``torch.jit.trace``'s own forward run
   when no legalization pass changed the graph, else a run of the graph); below
   ``min_psnr_db`` (35 dB, Apple's gate) nothing is written.

Files: ``UNet.mlpackage`` or ``UNet_chunk{k}.mlpackage``, ``ane_report.json``,
``export_log.txt``, ``manifest.json`` (the chain under ``extra.chunks``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapc.errors import SnapcError, ToolMissingError, VerificationError
from snapc.graph import Graph
from snapc.manifest import Manifest, versions
from snapc.numerics import compare
from snapc.passes.quantize import (
    NODE_PREFIX,
    apply_records_to_module,
    coreml_records,
    quant_records,
)
from snapc.pipeline import Pass, PassContext, Pipeline

__all__ = ["CoreMLOptions", "export", "pipeline", "DEPLOYMENT_TARGETS", "COMPUTE_UNITS",
           "MODEL_NAME", "OUTPUT_NAME", "CHUNK_LIMIT_BYTES"]

MODEL_NAME = "UNet"
OUTPUT_NAME = "noise_pred"
CHUNK_LIMIT_BYTES = 1_000_000_000  # iOS loads an unpalettized SD UNet only in pieces < 1 GB
DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
COMPUTE_UNITS = ("CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY")
FRONTENDS = ("trace", "export")
VERIFIERS = ("auto", "interpreter", "coreml")
ATTENTIONS = ("ane", "original")


@dataclass(frozen=True)
class CoreMLOptions:
    """Options of the Core ML target.

    ``frontend``: ``trace`` (torch.jit.trace, Apple's path) or ``export`` (torch.export).
    ``palettize``: k-means palettize every weight to this many bits (Apple ships 6).
    ``quantization``: per-layer records ``{layer or weight: {"scheme": "palette6"|"w8"|...}}``
    (see coreml_quant); they override ``palettize`` for their layers.
    ``chunks``: 0 splits only when weights exceed ``max_chunk_bytes``; 1 never; N >= 2 forces N.
    ``min_psnr_db``: verification gate against PyTorch (Apple's 35 dB).
    ``verifier``: ``auto`` (Core ML on macOS, else the numpy MIL interpreter), or force one.
    ``attention``: ``ane`` (SPLIT_EINSUM_V2 layout, queries in ``attention_chunk`` tokens) or
    ``original`` (attention as traced; CPU/GPU).
    """

    deployment_target: str = "iOS17"
    compute_units: str = "CPU_AND_NE"
    frontend: str = "trace"
    palettize: int | None = None
    quantization: dict[str, dict[str, Any]] = field(default_factory=dict)
    chunks: int = 0
    max_chunk_bytes: int = CHUNK_LIMIT_BYTES
    min_psnr_db: float = 35.0
    verifier: str = "auto"
    attention: str = "ane"
    attention_chunk: int = 512
    kmeans_workers: int = 1

    def check(self) -> None:
        """Raise SnapcError naming the fix when an option has an invalid value."""
        choices = {"deployment_target": DEPLOYMENT_TARGETS, "compute_units": COMPUTE_UNITS,
                   "frontend": FRONTENDS, "verifier": VERIFIERS, "attention": ATTENTIONS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise SnapcError(f"coreml {name} '{getattr(self, name)}' is not valid; "
                                 f"use one of {', '.join(valid)}")
        if self.chunks < 0:
            raise SnapcError(f"--chunks {self.chunks} is negative; use 0 (auto), 1 or N >= 2")


def pipeline(options: CoreMLOptions) -> list[Pass]:
    """Return the legalization passes run before conversion.

    ``attention="ane"``: fold attention (``fuse_attention``, ``fold_attention_heads``, q/k/v
    packing), then the Neural Engine layout (``passes/ane_layout.py``: channels-first,
    per-head split einsum, queries in ``attention_chunk`` pieces; Apple's SPLIT_EINSUM_V2) and
    decomposition of the remaining fused ops. Fusions already run are no-ops here.
    ``attention="original"``: nothing (Apple's ORIGINAL attention, for CPU/GPU).
    """
    if options.attention == "original":
        return []
    from snapc.passes.fuse import fusion_passes, lowering_passes

    folds = fusion_passes(["remove_identities", "fuse_attention", "fold_attention_heads",
                           "pack_qkv", "pack_kv"])
    return folds + lowering_passes("coreml", chunk=options.attention_chunk)


# ---- helpers ------------------------------------------------------------------------------------

def _require_coremltools() -> Any:
    """Import coremltools or raise ToolMissingError naming the fix."""
    try:
        with _quiet(io.StringIO()):
            import coremltools as ct
    except ImportError as exc:
        raise ToolMissingError(
            f"the coreml target needs coremltools ({exc}); "
            "pip install 'coremltools>=8' 'numpy<2.4'") from exc
    return ct


@contextlib.contextmanager
def _quiet(log: io.StringIO) -> Iterator[None]:
    """Send coremltools' progress bars, warnings and logging into ``log``."""
    logger = logging.getLogger("coremltools")
    level, propagate = logger.level, logger.propagate
    handler = logging.StreamHandler(log)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _unquieted(progress: Callable[[str], None]) -> Callable[[str], None]:
    """Return ``progress`` calling through to the streams of now, even inside ``_quiet``."""
    out, err = sys.stdout, sys.stderr

    def call(message: str) -> None:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            progress(message)

    return call


def _unflattened(graph: Graph) -> torch.nn.Module:
    """Return the graph's program as a module tree like the original model (names kept).

    ``torch.export.unflatten`` copies every parameter (3.4 GB for SD-1.5): the copies are
    swapped for the program's own tensors everywhere they are held (the modules, and the
    ``graph_module`` each InterpreterModule keeps outside its registered children), and the
    reference torch leaves to the module in the program's graph meta is dropped, so nothing of
    it outlives the conversion.
    """
    try:
        module = torch.export.unflatten(graph.program)
    except Exception:  # unflatten refuses some programs; the flat module converts the same
        return graph.module()
    meta = graph.program.graph_module.meta
    if meta.get("unflattened_module") is module:  # torch.export.unflatten sets it
        del meta["unflattened_module"]
    state = graph.program.state_dict
    copies = {id(t): (t, state[name]) for name, t in
              list(module.named_parameters()) + list(module.named_buffers()) if name in state}
    seen: set[int] = set()
    stack: list[torch.nn.Module] = [module]
    while stack:
        owner = stack.pop()
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        stack.extend(m for m in owner._modules.values() if m is not None)
        inner = owner.__dict__.get("graph_module")
        if isinstance(inner, torch.nn.Module):
            stack.append(inner)
        for leaf, tensor in list(owner._parameters.items()):
            if tensor is not None and id(tensor) in copies:
                owner._parameters[leaf] = torch.nn.Parameter(copies[id(tensor)][1],
                                                             requires_grad=False)
        for leaf, tensor in list(owner._buffers.items()):
            if tensor is not None and id(tensor) in copies:
                owner._buffers[leaf] = copies[id(tensor)][1]
    return module


def _scope_paths(traced: torch.jit.ScriptModule) -> dict[str, str]:
    """Return {TorchScript value name: module path} for the ops of a traced module."""
    paths: dict[str, str] = {}
    for node in traced.inlined_graph.nodes():
        scope = node.scopeName().split("/")[-1].removeprefix("__module.")
        scope = scope.removeprefix("net.") if scope != "net" else ""
        for out in node.outputs():
            paths[out.debugName()] = scope
    return paths


def _layer_finder(paths: dict[str, str]) -> Callable[[Any], str]:
    from coremltools.converters.mil.mil.scope import ScopeSource

    def layer_of(op: Any) -> str:
        names = op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_NAME) or []
        return paths.get(names[-1], "") if names else ""

    return layer_of


@contextlib.contextmanager
def _validate_once() -> Iterator[None]:
    """Skip coremltools' whole-program validation after each of its ~110 graph passes.

    ``PassPipelineManager`` re-validates the full program after every pass (O(passes x ops)):
    a third of an SD-1.5 conversion. Inside this context ``Program.validate`` does nothing;
    ``_convert`` validates the final program once instead, and the interpreter or Core ML
    then checks its numerics. Scoped here, never applied at import.
    """
    from coremltools.converters.mil.mil.program import Program

    original = Program.validate
    Program.validate = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Program.validate = original


@contextlib.contextmanager
def _fast_overflow_check() -> Iterator[None]:
    """Test fp32 constants for fp16 overflow with one masked max instead of ``np.where``.

    coremltools' fp16 cast pass (``FP16ComputePrecision.fp16_overflow``) looks for a value
    with 65504 < |v| < 1e38 in every fp32 constant through ``abs_value[np.where(...)]``, which
    builds int64 index arrays for every element: 51 s and over 1 GB at once for SD-1.5 (the
    largest single stage of a plain conversion). Inside this context the same test is
    ``np.max(|v|, where=|v| < 1e38, initial=0) > 65504``: the same answer for every input
    (NaN excluded by both). Scoped here, never applied at import.
    """
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    original = FP16ComputePrecision.__dict__["fp16_overflow"]

    def fp16_overflow(op: Any) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                if (var.op is not None and var.op.op_type == "const"
                        and var.is_tensor_or_scalar_of(dtype="fp32")):
                    magnitude = np.abs(np.asarray(var.op.val.val))
                    if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
                        return True
        return False

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original


@contextlib.contextmanager
def _alias_is_noop() -> Iterator[None]:
    """Convert ``aten::alias`` like ``alias_copy`` (a no-op) while converting.

    The fusion and ANE layout passes leave ``aten.alias`` nodes (views) that coremltools 9's
    torch frontend has no converter for; it already treats ``alias_copy``, ``clone`` and
    ``detach`` as no-ops. Registered for this conversion only, never at import.
    """
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    table = _TORCH_OPS_REGISTRY.name_to_func_mapping
    added = "alias" not in table
    if added:
        table["alias"] = table["alias_copy"]
    try:
        yield
    finally:
        if added:
            table.pop("alias", None)


def _convert(graph: Graph, options: CoreMLOptions, ct: Any,
             traced_output: list[torch.Tensor] | None = None,
             ) -> tuple[Any, Callable[[Any], str]]:
    """Convert ``graph`` to an MLModel; return it and a function naming each op's layer.

    With the trace frontend, ``traced_output`` (when given) receives the output of the forward
    run that ``torch.jit.trace`` makes: the graph run by PyTorch on its example inputs.
    """
    common = dict(
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, options.deployment_target),
        compute_units=getattr(ct.ComputeUnit, options.compute_units),
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        skip_model_load=True,
    )
    inputs = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32)
              for n, t in zip(graph.input_names, graph.example_inputs, strict=True)]
    if options.frontend == "export":
        program = graph.program.run_decompositions({})
        with _validate_once(), _fast_overflow_check(), _alias_is_noop():
            mlmodel = ct.convert(program, inputs=inputs, **common)
        mlmodel._mil_program.validate()
        return mlmodel, lambda op: ""
    module = _unflattened(graph)
    hook = (module.register_forward_hook(lambda _m, _i, out: traced_output.append(out.detach()))
            if traced_output is not None else None)
    with torch.no_grad():
        traced = torch.jit.trace(module, graph.example_inputs, check_trace=False, strict=False)
    if hook is not None:
        hook.remove()
    del module
    paths = _scope_paths(traced)
    with _validate_once(), _fast_overflow_check(), _alias_is_noop():
        mlmodel = ct.convert(traced, inputs=inputs, **common)
    mlmodel._mil_program.validate()
    return mlmodel, _layer_finder(paths)


def _repack(ct: Any, options: CoreMLOptions) -> Callable[[Any], Any]:
    """Return a function turning a finished MIL Program into an MLModel without re-optimizing."""
    def convert(program: Any) -> Any:
        return ct.convert(program, convert_to="mlprogram",
                          minimum_deployment_target=getattr(ct.target, options.deployment_target),
                          compute_units=getattr(ct.ComputeUnit, options.compute_units),
                          compute_precision=ct.precision.FLOAT32,
                          pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)

    return convert


def _coreml_runtime_reason(ct: Any) -> str | None:
    """Return why Core ML prediction cannot run here, or None when it can."""
    if platform.system() != "Darwin":
        return f"Core ML prediction runs only on macOS (this is {platform.system()})"
    try:
        from coremltools import libcoremlpython  # noqa: F401
    except ImportError:
        return "coremltools has no Core ML runtime bridge (libcoremlpython) on this machine"
    return None


def _predict_coreml(paths: list[Path], feeds: dict[str, np.ndarray], ct: Any,
                    options: CoreMLOptions) -> np.ndarray:
    """Run the chained packages with Core ML prediction (macOS) and return the output."""
    values: dict[str, np.ndarray] = dict(feeds)
    for path in paths:
        model = ct.models.MLModel(str(path),
                                  compute_units=getattr(ct.ComputeUnit, options.compute_units))
        names = [i.name for i in model.get_spec().description.input]
        values.update(model.predict({n: values[n] for n in names}))
    return np.asarray(values[OUTPUT_NAME])


def _predict_interpreter(paths: list[Path], feeds: dict[str, np.ndarray],
                         progress: Callable[[str], None],
                         expected: dict[str, np.ndarray] | None = None,
                         ) -> tuple[np.ndarray, dict[str, float]]:
    """Run the chained packages with the numpy MIL interpreter; return the output and, for
    each value named in ``expected`` that a chunk outputs, its max abs difference from it."""
    from snapc.targets.coreml_mil_interp import load_program, run_program

    values: dict[str, np.ndarray] = dict(feeds)
    diffs: dict[str, float] = {}
    for k, path in enumerate(paths, 1):
        progress(f"interpreting {path.name} ({k}/{len(paths)})")
        program = load_program(path)
        names = list(program.functions["main"].inputs)
        outputs = run_program(program, {n: values[n] for n in names})
        del program
        for name, value in outputs.items():
            if expected is not None and name in expected:
                diffs[name] = _max_abs_diff(value, expected[name])
        values.update(outputs)
    return np.asarray(values[OUTPUT_NAME]), diffs


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Return max |a - b|: 0.0 only when equal (NaN where NaN), inf for a shape or NaN
    mismatch."""
    if a.shape != b.shape:
        return float("inf")
    if np.array_equal(a, b, equal_nan=True):
        return 0.0
    diff = float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))
    return diff if diff > 0.0 else float("inf")  # NaN (or equal values of unequal dtype)


def _write_chunks(whole: Path, out_dir: Path, n_chunks: int, options: CoreMLOptions,
                  progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Split the package ``whole`` into chained packages in ``out_dir``; return the chain.

    With ``chunks=0`` (auto) a chunk at or over ``max_chunk_bytes`` adds one more chunk and
    splits again; with an explicit count it raises SnapcError naming the fix.
    """
    from snapc.targets.coreml_chunk import split_package

    while True:
        progress(f"splitting into {n_chunks} chunks")
        paths = [out_dir / f"{MODEL_NAME}_chunk{k}.mlpackage" for k in range(1, n_chunks + 1)]
        specs = split_package(whole, n_chunks, paths)
        too_big = [s for s in specs if s.weight_bytes >= options.max_chunk_bytes]
        if not too_big:
            break
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        if options.chunks:
            raise SnapcError(f"chunk {too_big[0].index} holds {too_big[0].weight_bytes} weight "
                             f"bytes >= {options.max_chunk_bytes}; ask for more --chunks")
        n_chunks += 1
    return [{"file": path.name, **spec.to_json()} for path, spec in zip(paths, specs,
                                                                         strict=True)]


# ---- the entry point -------------------------------------------------------------------------

def export(
    graph: Graph,
    out_dir: Path,
    options: CoreMLOptions = CoreMLOptions(),
    progress: Callable[[str], None] = lambda _: None,
) -> Manifest:
    """Write the Core ML artifact of ``graph`` into ``out_dir`` (an empty folder); return its
    manifest.

    Raises ToolMissingError without coremltools, VerificationError when the packages miss
    ``min_psnr_db`` against PyTorch or the chunk chain differs from the whole program.
    """
    from snapc.targets.coreml_ane_report import ane_report
    from snapc.targets.coreml_chunk import chunks_needed, weight_bytes
    from snapc.targets.coreml_mil_interp import run_program
    from snapc.targets.coreml_quant import (
        apply_quantization,
        compressed_weights,
        plan_quantization,
        weight_sizes,
    )

    ct = _require_coremltools()
    options.check()
    out_dir = Path(out_dir)
    progress = _unquieted(progress)
    log = io.StringIO()
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        with _quiet(log):
            result = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        return result

    records = quant_records(graph)
    weight_records = {k: r for k, r in records.items() if not k.startswith(NODE_PREFIX)}
    # With records, convert the graph whose weights hold the quantized values: Core ML then
    # stores them compressed exactly (coreml_quant: palettes from unique values), and that
    # fake-quantized graph is the verification reference.
    source = (apply_records_to_module(graph, weight_records, activations=False)
              if weight_records else graph)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(graph.input_names,
                                                         graph.example_inputs, strict=True)}
    passes = pipeline(options)
    legal = None
    if passes:
        progress(f"Neural Engine attention layout ({len(passes)} passes, each verified)")
        legal = timed("legalize_s", lambda: Pipeline(passes).run(source,
                                                                 PassContext(check=True)))
    target_graph = legal.graph if legal else source
    progress(f"converting with coremltools ({options.frontend} frontend)")
    traced: list[torch.Tensor] = []
    mlmodel, layer_of = timed("convert_s", lambda: _convert(target_graph, options, ct, traced))
    # jit.trace ran the converted graph on the example inputs: when no pass changed it, that
    # run is the PyTorch reference (one SD-1.5 forward less); else the source graph's output.
    reference = (traced.pop() if target_graph is source and len(traced) == 1
                 and isinstance(traced[0], torch.Tensor) else source.example_output)
    program = mlmodel._mil_program

    progress("checking Neural Engine constraints")
    report = timed("ane_report_s", lambda: ane_report(program, layer_of))
    report.write(out_dir / "ane_report.json")
    plan = plan_quantization(weight_sizes(program), options.quantization, options.palettize,
                             applied=coreml_records(records))
    if plan.unmatched:
        raise SnapcError(f"{len(plan.unmatched)} quantization record(s) name no weight of the "
                         f"model, e.g. '{plan.unmatched[0]}'; use layer names from snapc inspect")
    if plan.schemes:
        progress(f"quantizing {len(plan.schemes)} weights ({plan.counts()})")
        timed("quantize_s", lambda: apply_quantization(program, plan, options.kmeans_workers))
        mlmodel = timed("repack_s", lambda: _repack(ct, options)(program))
    total = weight_bytes(program)
    compressed = compressed_weights(program)
    whole_path = Path(mlmodel.package_path)
    n_chunks = options.chunks or chunks_needed(total, options.max_chunk_bytes)
    files: dict[str, str] = {"ane_report": "ane_report.json", "log": "export_log.txt"}
    chain: list[dict[str, Any]] = []
    if n_chunks >= 2:
        chain = timed("chunk_s", lambda: _write_chunks(whole_path, out_dir, n_chunks, options,
                                                       progress))
        paths = [out_dir / c["file"] for c in chain]
        files.update({f"chunk{c['index']}": c["file"] for c in chain})
    else:
        path = out_dir / f"{MODEL_NAME}.mlpackage"
        timed("save_s", lambda: mlmodel.save(str(path)))
        paths = [path]
        files["model"] = path.name

    # The chain check's reference: the whole converted program (the one in memory, which the
    # package was written from), run once by the interpreter, keeping the value of every chunk
    # boundary. The chain run below then compares each chunk's outputs with these.
    boundaries: dict[str, np.ndarray] | None = None
    if len(paths) > 1:
        progress("running the whole program with the MIL interpreter (chain reference)")
        names = [n for c in chain for n in c["outputs"]]
        boundaries = timed("chain_check_s", lambda: run_program(program, feeds, keep=names))
    mlmodel._mil_program = None  # verification reads the written packages; free this copy
    program = None

    reason = _coreml_runtime_reason(ct)
    use_coreml = options.verifier == "coreml" or (options.verifier == "auto" and reason is None)
    if use_coreml and reason is not None:
        raise ToolMissingError(f"verifier 'coreml' cannot run: {reason}; use --verifier "
                               "interpreter")
    progress("verifying with " + ("Core ML prediction" if use_coreml else "the MIL interpreter"))
    diffs: dict[str, float] = {}
    if use_coreml:
        output = timed("verify_s", lambda: _predict_coreml(paths, feeds, ct, options))
        if boundaries is not None:  # the chain check runs the interpreter on the chunks too
            _, diffs = _predict_interpreter(paths, feeds, progress, boundaries)
    else:
        output, diffs = timed("verify_s", lambda: _predict_interpreter(paths, feeds, progress,
                                                                       boundaries))
    numerics = compare(reference, torch.from_numpy(output.astype(np.float32)))
    vs_fp32 = (compare(graph.example_output, torch.from_numpy(output.astype(np.float32)))
               if weight_records else None)

    chain_check: dict[str, Any] = {"ran": False}
    if boundaries is not None:
        progress("checking that the chained chunks equal the whole program")
        missing = sorted(set(boundaries) - set(diffs))
        diff = max(diffs.values(), default=0.0) if not missing else float("inf")
        worst = max(diffs, key=diffs.get) if diffs else ""
        chain_check = {"ran": True, "max_abs_diff": diff, "equal": diff == 0.0,
                       "boundaries_compared": len(diffs),
                       "compared": "every chunk output (chunk boundaries and the model output) "
                                   "vs the whole program's value of the same name",
                       "runtime": "numpy MIL interpreter"}
        if diff != 0.0:
            where = (f"boundary values {missing[:3]} never produced" if missing
                     else f"max abs {diff:.3g} at '{worst}'")
            raise VerificationError(f"chained chunks differ from the whole program ({where}); "
                                    "artifact not written")
    mlmodel = None  # removes its temporary package
    (out_dir / "export_log.txt").write_text(log.getvalue())
    if not numerics.passes(options.min_psnr_db):
        raise VerificationError(
            f"Core ML output PSNR {numerics.psnr_db:.1f} dB < {options.min_psnr_db} dB vs "
            f"{'the fake-quantized ' if weight_records else ''}PyTorch graph (max abs err "
            f"{numerics.max_abs:.3g}); artifact not written")

    verification = {
        "reference": (f"torch fake-quantized graph (weights of the {len(weight_records)} "
                      "records quantize-dequantized; fp32, CPU)" if weight_records
                      else "torch (same graph, fp32, CPU)"),
        "runtime": ("Core ML prediction (" + options.compute_units + ")" if use_coreml
                    else "numpy MIL interpreter (fp16 storage, fp32 compute)"),
        "coreml_prediction": "ran" if use_coreml else f"skipped: {reason}",
        "inputs": "the graph's example inputs",
        "min_psnr_db": options.min_psnr_db,
        "passed": True,
        "chain_check": chain_check,
        **numerics.to_json(),
        **({"vs_fp32": vs_fp32.to_json()} if vs_fp32 else {}),
    }
    manifest = Manifest.for_graph(
        graph, "coreml", files=files, target_options=asdict(options),
        verification=verification,
        versions=versions("coremltools", "numpy", "diffusers"),
        extra={
            "format": "mlprogram", "precision": "fp16",
            "weight_bytes": total, "chunks": chain,
            "quantization": {"schemes": plan.counts(), "palettize": options.palettize,
                             "left_fp16_small": list(plan.too_small),
                             "compressed_ops": compressed},
            "ane_report": report.to_json() | {"issues": len(report.issues)},
            "target_passes": [r.to_json() for r in legal.records] if legal else [],
            "timings": timings,
            "package_bytes": sum(f.stat().st_size for p in paths for f in p.rglob("*")
                                 if f.is_file()),
        },
    )
    if records:
        manifest.quantization["realised"] = _realised(records, plan)
    return manifest


def _realised(records: dict[str, dict[str, Any]], plan: Any) -> dict[str, Any]:
    """Return how the graph's records were realised in the package, for the manifest."""
    counts: dict[str, int] = {}
    for const in plan.exact:
        counts[plan.schemes[const]] = counts.get(plan.schemes[const], 0) + 1
    schemes = {r["scheme"] for r in records.values()}
    return {"format": "coremltools.optimize.coreml (constexpr weights)", "realised": counts,
            "left_fp16_merged": list(plan.not_found), "left_fp16_small": len(plan.too_small),
            "notes": [note for scheme, note in _NOTES.items() if scheme in schemes]}


# What Core ML does not keep of a record (the weights still hold the quantized values).
_NOTES = {
    "w8a8": "w8a8: weights int8; activations are not quantized (Core ML computes fp16)",
    "w4": "w4: stored fp16 (values quantized); use palette4 for 4-bit storage",
    "fp32": "fp32 islands: not kept, Core ML computes fp16",
}
