"""The compile flow behind `snapc compile`: load, trace, run passes, export, verify.

Library code: it reports progress through a Reporter and never prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from snapc.artifacts import atomic_output_dir, check_output_dir
from snapc.errors import SnapcError
from snapc.frontend import trace
from snapc.graph import Graph
from snapc.manifest import Manifest
from snapc.models import load_model
from snapc.pipeline import Pass, PassContext, PassResult, Pipeline, PipelineResult
from snapc.targets import TARGETS, TargetEntry, get_target

__all__ = ["CompileOptions", "CompileResult", "Reporter", "NullReporter", "compile_model",
           "check_options", "check_quantize", "load_graph", "quantization_to_manifest",
           "random_weights_warning"]


class Reporter(Protocol):
    """Receives progress of a long run (the CLI shows it with rich)."""

    def stage(self, name: str) -> None: ...

    def done(self, name: str, seconds: float, detail: str = "") -> None: ...

    def warn(self, message: str) -> None: ...


class NullReporter:
    """A Reporter that ignores everything."""

    def stage(self, name: str) -> None:
        """Ignore the start of a stage."""

    def done(self, name: str, seconds: float, detail: str = "") -> None:
        """Ignore the end of a stage."""

    def warn(self, message: str) -> None:
        """Ignore a warning."""


@dataclass(frozen=True)
class CompileOptions:
    """What to compile, for which target, into which folder."""

    model: str
    target: str
    out: Path
    arch: str | None = None
    remove: tuple[str, ...] = ()
    latent: int | None = None
    batch: int = 1
    force: bool = False
    seed: int = 0
    target_options: dict = field(default_factory=dict)
    search: dict | None = None  # SearchBlocks arguments (device, budget, budget_ms, keep, ...)
    fusions: str = "none"  # "all", "none" or comma-separated fusion pass names
    quantize: dict | None = None  # Quantize arguments (scheme, size_mb, psnr_floor_db, ...)


@dataclass(frozen=True)
class CompileResult:
    """The manifest written, the final graph, and the stage timings."""

    manifest: Manifest
    graph: Graph
    pipeline: PipelineResult
    timings: dict[str, float]


def random_weights_warning(name: str) -> str:
    """Return the warning shown on every run of a random-weight model."""
    return (f"model '{name}' has random weights: results are for latency and compile checks "
            "only, not image quality")


def load_graph(model: str, *, arch: str | None = None, batch: int = 1,
               latent: int | None = None, seed: int = 0, device: str = "cpu") -> Graph:
    """Load MODEL (name, folder or file) and return its traced Graph; a pruned-UNet folder's
    removed blocks are removed from it."""
    loaded = load_model(model, arch=arch, batch=batch, latent=latent, seed=seed, device=device)
    graph = trace(loaded.module, loaded.example_inputs, loaded.info)
    if loaded.removed:
        from snapc.passes import remove_blocks

        graph, _ = remove_blocks(graph, loaded.removed)
    return graph


class _PassReporter:
    """Instrument that forwards pass start/end to a Reporter."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def before_pass(self, pass_: Pass, graph: Graph) -> None:
        self.reporter.stage(f"pass {pass_.name}")

    def after_pass(self, pass_: Pass, result: PassResult, seconds: float) -> None:
        self.reporter.done(f"pass {pass_.name}", seconds, f"{len(result.changes)} change(s)")


def default_passes(options: CompileOptions) -> list[Pass]:
    """Return the pass list the compile options ask for."""
    from snapc.passes import (
        Quantize,
        RemoveBlocks,
        SearchBlocks,
        fusion_passes,
        lowering_passes,
    )

    passes: list[Pass] = []
    if options.remove:
        passes.append(RemoveBlocks(options.remove))
    if options.search is not None:
        passes.append(_made(SearchBlocks, options.search, "search"))
    # Fusions come after block removal and search: those need the original nodes.
    fusions = fusion_passes(options.fusions)
    if fusions:
        passes += fusions
        passes += lowering_passes(_LOWERING.get(options.target, "tvm"))
    if options.quantize is not None:  # last: its records name the final weights
        passes.append(Quantize(**options.quantize))
    return passes


def check_quantize(options: CompileOptions, entry: TargetEntry,
                   target_options: object = None) -> None:
    """Raise SnapcError when ``options.quantize`` is invalid or the target cannot realise it;
    cheap, so compile_model runs it before loading anything. An fp16 build (``precision``
    target option) realises fp16 records whatever the target's default."""
    from snapc.passes import Quantize

    if options.quantize is None:
        return
    quantize = _made(Quantize, options.quantize, "quantize")
    quantize.check()
    fp16_build = quantize.scheme == "fp16" and getattr(target_options, "precision", "") == "fp16"
    if quantize.scheme not in entry.quant_schemes and not fp16_build:
        realising = sorted(n for n, e in TARGETS.items() if quantize.scheme in e.quant_schemes)
        raise SnapcError(f"target '{entry.name}' does not realise --quantize {quantize.scheme}; "
                         f"targets that do: {', '.join(realising)}")


def _made(cls: type, kwargs: dict, what: str) -> Any:
    """Return ``cls(**kwargs)``; an argument ``cls`` does not take is a SnapcError naming the
    valid ones (``what``: the CompileOptions field)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise SnapcError(f"CompileOptions.{what} has no option {', '.join(unknown)}; valid: "
                         f"{', '.join(valid)}")
    return cls(**kwargs)


def _check_search(options: CompileOptions) -> None:
    """Raise SnapcError when the block search of ``options`` cannot run (see
    SearchBlocks.check), has no budget, or pins a block that ``remove`` removes."""
    from snapc.passes import SearchBlocks

    search = _made(SearchBlocks, options.search or {}, "search")
    if search.budget is None and search.budget_ms is None:
        given = [flag for flag, value in (("--device", search.device), ("--keep", search.keep),
                                          ("--table", search.table)) if value]
        what = (f"{', '.join(given)} {'choose' if len(given) > 1 else 'chooses'} blocks by "
                "search" if given else "block search")
        raise SnapcError(f"{what}, which needs a latency budget: add --budget F (fraction of "
                         "the original) or --budget-ms MS")
    search.check()
    both = sorted(set(options.remove) & set(search.keep))
    if both:
        raise SnapcError(f"block {both[0]} is both removed (--remove) and pinned (--keep); "
                         "drop one of the two")


def check_options(options: CompileOptions) -> tuple[TargetEntry, Any]:
    """Raise SnapcError naming the fix for anything in ``options`` that is wrong without
    looking at the model: the target and its options, batch and latent sizes, the fusion
    names, the block search (device, budget, table, pinned blocks), the quantization and the
    output folder. Return the target entry and its options object.

    compile_model runs it first, before loading anything; block and model names need the
    model and are checked when it is loaded.
    """
    from snapc.passes import fusion_passes

    entry = get_target(options.target)
    target_options = entry.make_options(**options.target_options)
    if hasattr(target_options, "check"):
        target_options.check()
    if options.batch < 1:
        raise SnapcError(f"--batch {options.batch}: give a batch size >= 1")
    if options.latent is not None and options.latent < 1:
        raise SnapcError(f"--latent {options.latent}: give a latent height/width >= 1")
    fusion_passes(options.fusions)
    if options.search is not None:
        _check_search(options)
    check_quantize(options, entry, target_options)
    check_output_dir(options.out, options.force)
    return entry, target_options


# Which lowering a target needs after fusion: ONNX has kernels for the fused ops, Core ML wants
# the Neural Engine attention layout, TVM (every other target) plain ATen ops.
_LOWERING = {"onnx": "onnx", "coreml": "coreml"}


def quantization_to_manifest(manifest: Manifest) -> None:
    """Put the Quantize pass's scheme and mixed-precision figures into the manifest's
    ``quantization`` section, whose ``layers`` already hold the per-layer records (the pass
    entry points there instead of repeating them)."""
    for entry in manifest.passes:
        if entry["name"] != "quantize":
            continue
        info = entry["info"]
        if "records" in info:
            info["records"] = "see quantization.layers"
        manifest.quantization["scheme"] = entry["params"]["scheme"]
        if "kept_float" in info:
            manifest.quantization["kept_float"] = info["kept_float"]
        if "mixed" in info:
            manifest.quantization["mixed"] = {k: v for k, v in info["mixed"].items()
                                              if k != "layers"}
            manifest.quantization["mixed"]["per_layer"] = "see passes[].info.mixed.layers"


def compile_model(
    options: CompileOptions,
    passes: Sequence[Pass] | None = None,
    reporter: Reporter | None = None,
) -> CompileResult:
    """Compile ``options.model`` for ``options.target`` into ``options.out``; return the result.

    ``passes`` replaces the passes derived from the options. The options are checked first
    (:func:`check_options`), before the model is loaded. The artifact folder appears only
    when everything, verification included, succeeded.
    """
    reporter = reporter or NullReporter()
    entry, target_options = check_options(options)
    timings: dict[str, float] = {}

    reporter.stage("load model")
    start = time.perf_counter()
    loaded = load_model(options.model, arch=options.arch, batch=options.batch,
                        latent=options.latent, seed=options.seed)
    timings["load"] = time.perf_counter() - start
    reporter.done("load model", timings["load"], loaded.info.name)
    if loaded.info.random_weights:
        reporter.warn(random_weights_warning(loaded.info.name))

    reporter.stage("trace (torch.export)")
    start = time.perf_counter()
    graph = trace(loaded.module, loaded.example_inputs, loaded.info)
    counts = graph.blocks.counts()
    timings["trace"] = time.perf_counter() - start
    reporter.done("trace (torch.export)", timings["trace"],
                  f"{len(graph.fx.nodes)} nodes, {counts.get('resnet', 0)} ResNet, "
                  f"{counts.get('transformer', 0)} transformer blocks")

    pass_list = list(passes) if passes is not None else default_passes(options)
    if loaded.removed:  # a pruned-UNet folder: its blocks go first, as a recorded pass
        from snapc.passes import RemoveBlocks

        pass_list.insert(0, RemoveBlocks(loaded.removed))
    start = time.perf_counter()
    ctx = PassContext(check=True, verify=bool(pass_list),
                      instruments=[_PassReporter(reporter)],
                      options={"progress": reporter.stage})
    result = Pipeline(pass_list).run(graph, ctx)
    timings["passes"] = time.perf_counter() - start

    export, _ = entry.load()
    reporter.stage(f"emit {options.target}")
    start = time.perf_counter()
    with atomic_output_dir(options.out, options.force) as tmp:
        kwargs = {}
        if "progress" in inspect.signature(export).parameters:
            kwargs["progress"] = lambda msg: reporter.stage(f"{options.target}: {msg}")
        manifest = export(result.graph, tmp, target_options, **kwargs)
        manifest.passes = [r.to_json() for r in result.records]
        quantization_to_manifest(manifest)
        for record in result.records:
            if "search" in record.info:
                from snapc.search_report import plot_front

                plot_front(record.info["search"], tmp / "search_front.png")
                manifest.files["search_front"] = "search_front.png"
        if loaded.info.random_weights:
            manifest.notes.append(random_weights_warning(loaded.info.name))
        timings["emit"] = time.perf_counter() - start
        manifest.extra["compile_timings"] = {k: round(v, 2) for k, v in timings.items()}
        manifest.write(tmp)
    reporter.done(f"emit {options.target}", timings["emit"], str(options.out))
    return CompileResult(manifest, result.graph, result, timings)
