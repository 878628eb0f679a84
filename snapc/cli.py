"""The `snapc` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from snapc.artifacts import atomic_output_file
from snapc.cli_common import ForceOpt, ModelArg, err, fail, out
from snapc.errors import SnapcError

if TYPE_CHECKING:
    from snapc.manifest import Manifest

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Optimise and compile diffusion UNets for phones.")
ArchOpt = Annotated[str | None, typer.Option(help="architecture of a bare weights file")]
LatentOpt = Annotated[int | None, typer.Option(help="latent height/width (default: config)")]
BatchOpt = Annotated[int, typer.Option(min=1, help="batch size of the traced UNet")]


class RichReporter:
    """Shows each stage with a spinner and its time when it ends (rich status)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("starting")
        self.started: dict[str, float] = {}

    def __enter__(self) -> RichReporter:
        self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.stop()

    def stage(self, name: str) -> None:
        """Show ``name`` as the running stage."""
        self.started.setdefault(name, time.perf_counter())
        self.status.update(f"[bold]{name}[/]...")

    def done(self, name: str, seconds: float, detail: str = "") -> None:
        """Print a finished stage with its time."""
        self.console.print(f"[green]✓[/] {name} [dim]({seconds:.1f} s)[/] {detail}")

    def warn(self, message: str) -> None:
        """Print a warning."""
        self.console.print(f"[yellow]warning:[/] {message}")


@app.command("compile")
def compile_cmd(
    model: ModelArg,
    target: Annotated[str, typer.Option("--target", "-t", help="onnx (see `snapc targets`)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="artifact folder to create")],
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", help="block to remove (repeatable); see `snapc inspect`")] = None,
    latent: LatentOpt = None,
    batch: BatchOpt = 1,
    arch: ArchOpt = None,
    force: ForceOpt = False,
    seed: Annotated[int, typer.Option(help="seed of random weights and example inputs")] = 0,
    device: DeviceOpt = None,
    budget: BudgetOpt = None,
    budget_ms: BudgetMsOpt = None,
    keep: KeepOpt = None,
    table: TableOpt = None,
    calibration: CalibrationOpt = 8,
    eval_device: EvalDeviceOpt = "cpu",
    proxy_space: SpaceOpt = "eps",
    fusions: Annotated[str, typer.Option(
        help="fusion passes: all, none, or comma-separated names (see `snapc passes`)")]
    = "none",
    quantize: Annotated[str | None, typer.Option(
        help="quantize as the last pass: fp16, w8, w4, w8a8, palette6, palette4, mixed")]
    = None,
    size_mb: Annotated[float | None, typer.Option(
        help="--quantize mixed: artifact size budget in MB (1e6 bytes)")] = None,
    psnr_floor: Annotated[float | None, typer.Option(
        help="--quantize mixed: lowest UNet output PSNR (dB) vs fp32")] = None,
    coreml_frontend: Annotated[str | None, typer.Option(
        help="coreml: trace (torch.jit.trace, default) or export (torch.export)")] = None,
    coreml_chunks: Annotated[int | None, typer.Option(
        min=0, help="coreml: 0 splits above 1 GB of weights (default), 1 never, N >= 2 forces N")]
    = None,
    coreml_palettize: Annotated[int | None, typer.Option(
        help="coreml: k-means palettize the weights without a record to 1, 2, 4, 6 or 8 bits")]
    = None,
    coreml_deployment_target: Annotated[str | None, typer.Option(
        help="coreml: iOS16, iOS17 (default), iOS18, macOS13, macOS14, macOS15")] = None,
    coreml_compute_units: Annotated[str | None, typer.Option(
        help="coreml: CPU_AND_NE (default), ALL, CPU_AND_GPU, CPU_ONLY")] = None,
    coreml_attention: Annotated[str | None, typer.Option(
        help="coreml: ane (Neural Engine layout, default) or original (as traced)")] = None,
    coreml_verifier: Annotated[str | None, typer.Option(
        help="coreml: auto (default), interpreter (numpy MIL) or coreml (macOS)")] = None,
    recover: Annotated[float | None, typer.Option(
        help="with --device/--budget: recover the pruned model by distillation for this many "
             "minutes before compiling (see `snapc distill`)")] = None,
    train_device: Annotated[str, typer.Option(help="--recover: auto, cpu or cuda")] = "auto",
    components: Annotated[str | None, typer.Option(
        help="compile these components into sub-folders with a top-level manifest: unet, "
             "text_encoder, vae_decoder (comma-separated; default: the UNet alone, as one "
             "artifact)")]
    = None,
    tuning: Annotated[Path | None, typer.Option(
        help="TVM targets: apply these MetaSchedule records (from `snapc tune`)")] = None,
    offload: Annotated[str | None, typer.Option(
        help="TVM targets: vendor library for heavy ops: cublas, cudnn (cuda), clml (adreno), "
             "dnnl (x86)")] = None,
    mcpu: Annotated[str | None, typer.Option(
        help="TVM cpu targets: LLVM CPU (native: this machine's)")] = None,
    precision: Annotated[str | None, typer.Option(
        help="TVM targets: fp16 or fp32 compute (default: fp16 on mali/adreno, else fp32)")]
    = None,
    tensor_cores: Annotated[bool | None, typer.Option(
        "--tensor-cores/--no-tensor-cores",
        help="TVM cuda at --precision fp16: tensor-core (WMMA) schedules for matmuls and "
             "convolutions")] = None,
) -> None:
    """Compile MODEL for a target; exit 0 only when the artifact verified.

    With --device and --budget/--budget-ms, block search runs first (see `snapc search`);
    with --quantize, quantization is the last pass and the target realises its records."""
    from snapc.compiler import CompileOptions, compile_model
    from snapc.targets import get_target

    search = None  # compile_model checks it (device, budget, table) before loading the model
    if any(v is not None for v in (device, budget, budget_ms, table)) or keep:
        search = _search_args(device, budget, budget_ms, keep, table, calibration, eval_device,
                              space=proxy_space)
    quant = None
    if quantize is not None:
        quant = {"scheme": quantize, "size_mb": size_mb, "psnr_floor_db": psnr_floor,
                 "calibration": calibration, "seed": seed}
    elif size_mb is not None or psnr_floor is not None:
        fail(SnapcError("--size-mb/--psnr-floor need --quantize mixed"))
    coreml = {"frontend": coreml_frontend, "chunks": coreml_chunks,
              "palettize": coreml_palettize, "deployment_target": coreml_deployment_target,
              "compute_units": coreml_compute_units, "attention": coreml_attention,
              "verifier": coreml_verifier}
    given = [f"--coreml-{k.replace('_', '-')}" for k, v in coreml.items() if v is not None]
    tvm = {"tuning": str(tuning) if tuning else None, "offload": offload, "mcpu": mcpu,
           "precision": precision, "tensor_cores": tensor_cores}
    options = CompileOptions(model=model, target=target, out=output, arch=arch,
                             remove=tuple(remove or ()), latent=latent, batch=batch,
                             force=force, seed=seed, search=search, fusions=fusions,
                             quantize=quant,
                             target_options={k: v for k, v in {**coreml, **tvm}.items()
                                             if v is not None})
    try:
        tvm_given = [f"--{k.replace('_', '-')}" for k, v in tvm.items() if v is not None]
        if tvm_given and get_target(target).module != "snapc.targets.tvm":
            raise SnapcError(f"{', '.join(tvm_given)} applies only to the TVM targets (x86, "
                             f"cuda, arm-cpu, mali, adreno), not --target {target}")
        if given and not get_target(target).name.startswith("coreml"):
            raise SnapcError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} "
                             "only to the coreml targets (coreml, coreml-palette6), not "
                             f"--target {target}")
        if components is not None:
            return _compile_components(options, components, recover)
        if recover is not None:
            result = _recover_then_compile(options, budget, recover, train_device)
        else:
            with RichReporter(err) as reporter:
                result = compile_model(options, reporter=reporter)
    except SnapcError as exc:
        fail(exc)
    manifest = result.manifest
    table = Table(title=f"snapc compile {model} → {target}", show_header=False)
    table.add_row("artifact", str(output))
    table.add_row("files", ", ".join(manifest.files.values()))
    table.add_row("params", f"{manifest.model['params']:,}")
    table.add_row("removed blocks", ", ".join(manifest.model["removed_blocks"]) or "none")
    table.add_row("verified", _verification_line(manifest.verification))
    if manifest.quantization:
        table.add_row("quantized", _quantization_line(manifest))
    table.add_row("time", ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    out.print(table)


def _compile_components(options, components: str, recover: float | None) -> None:
    """Run compile_components and print one row per component."""
    from snapc.components import compile_components, parse_components

    if recover is not None:
        raise SnapcError("--recover and --components do not combine; recover with snapc "
                         "distill, then compile its folder with --components")
    with RichReporter(err) as reporter:
        result = compile_components(options, parse_components(components), reporter=reporter)
    table = Table(title=f"snapc compile {options.model} → {options.target} (components)")
    for column in ("component", "folder", "batch", "verified", "quantized", "time"):
        table.add_column(column)
    for entry in result.manifest["components"]:
        manifest = result.results[entry["name"]].manifest
        table.add_row(entry["name"], f"{options.out}/{entry['folder']}", str(entry["batch"]),
                      _verification_line(manifest.verification),
                      _quantization_line(manifest) if manifest.quantization else "no",
                      f"{result.timings[entry['name']]:.1f} s")
    out.print(table)
    sampler = result.manifest["sampler"]
    out.print(f"sampler: {sampler['steps']} {sampler['spacing']} DDIM steps, guidance "
              f"{sampler['guidance']:g}; run it with snapc generate {options.out} --prompt TEXT "
              "-o DIR", highlight=False)


def _recover_then_compile(options, budget: float | None, minutes: float, train_device: str):
    """Search and recover into a temporary pruned folder (snapc distill's flow), then compile
    that folder; the recovery record goes into the manifest."""
    import dataclasses
    import tempfile

    from snapc.cli_training import TrainBar
    from snapc.compiler import check_options, compile_model
    from snapc.train import RecoveryLoss, RecoveryOptions, TrainOptions, distill_recovery

    if options.search is None or budget is None:
        raise SnapcError("--recover needs --device and --budget (the search picks the blocks "
                         "it recovers); to recover named blocks use `snapc distill --remove`")
    if options.remove:
        raise SnapcError("--recover recovers the search's pick; use `snapc distill --remove` "
                         "for named blocks, then compile its folder")
    check_options(options)
    recovery = RecoveryOptions(model=options.model, out=Path("recovered"),
                               device=options.search["device"], budget=budget,
                               keep=options.search["keep"], arch=options.arch,
                               name=f"{options.model}-recovered")
    train_options = TrainOptions(minutes=minutes, device=train_device)
    train_options.check()
    options.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{options.out.name}.recover-",
                                     dir=options.out.parent) as tmp:
        recovery = dataclasses.replace(recovery, out=Path(tmp) / "recovered")
        with TrainBar() as bar:
            record = distill_recovery(recovery, train_options, RecoveryLoss(),
                                      progress=bar.update, report=bar.stage)
        compiled = dataclasses.replace(options, model=str(recovery.out), search=None,
                                       arch=None)
        with RichReporter(err) as reporter:
            result = compile_model(compiled, reporter=reporter)
    manifest = result.manifest
    manifest.extra["recovery"] = {k: v for k, v in record.items() if k != "loss_curve"}
    with atomic_output_file(options.out / "manifest.json") as path:
        path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return result


def _verification_line(ver: dict) -> str:
    """Return one line saying how the artifact was checked (numerics, compile-only, or not)."""
    if "psnr_db" in ver:
        return (f"PSNR {ver['psnr_db']:.1f} dB (≥ {ver['min_psnr_db']}), max abs "
                f"{ver['max_abs']:.2e}, cosine {ver['cosine']:.6f} [{ver['runtime']}]")
    if ver.get("passed"):
        return f"passed: {ver.get('checked_build', ver.get('compiler', 'see manifest'))}"
    return f"compiled, not run: {ver.get('reason', 'see manifest')}"


def _quantization_line(manifest: Manifest) -> str:
    """Return one line: the scheme, records per scheme, what stayed float (layers under the
    size floor, embedding tables) and the PSNR vs fp32 when measured."""
    quant = manifest.quantization
    counts = ", ".join(f"{n} {s}" for s, n in quant.get("counts", {}).items())
    kept = quant.get("kept_float") or {}
    floats = [f"{what} {len(kept[k])}" for k, what in
              (("small_layers", f"layers under {kept.get('min_elements')} values"),
               ("embeddings", "embedding tables")) if kept.get(k)]
    vs_fp32 = manifest.verification.get("vs_fp32")
    return (f"{quant.get('scheme', 'records')}: {counts}"
            + (f"; float: {', '.join(floats)}" if floats else "")
            + (f"; PSNR vs fp32 {vs_fp32['psnr_db']:.1f} dB" if vs_fp32 else ""))


DeviceOpt = Annotated[str | None, typer.Option(
    help="device for block search: iphone14pro-ane, adreno740, mali-g715, h100, local-cpu, "
         "or a profile file")]
BudgetOpt = Annotated[float | None, typer.Option(
    help="latency budget as a fraction of the original on --device, 0 < F < 1")]
BudgetMsOpt = Annotated[float | None, typer.Option(help="latency budget in ms on --device")]
KeepOpt = Annotated[list[str] | None, typer.Option(
    "--keep", help="block the search must not remove (repeatable)")]
TableOpt = Annotated[Path | None, typer.Option(
    help="latency table measured on --device (from `snapc profile`)")]
CalibrationOpt = Annotated[int, typer.Option(
    min=1, help="calibration triples for the search proxy and the quantization observers")]
EvalDeviceOpt = Annotated[str, typer.Option(help="cpu or cuda: where candidates are scored")]
SpaceOpt = Annotated[str, typer.Option(
    help="proxy compares noise predictions (eps) or the clipped x0 they imply (x0)")]


def _search_args(device: str, budget: float | None, budget_ms: float | None,
                 keep: list[str] | None, table: Path | None, calibration: int,
                 eval_device: str, rescore: bool = True,
                 quality_floor: float | None = None, space: str = "eps") -> dict:
    """Return SearchBlocks keyword arguments from CLI options."""
    return {"device": device, "budget": budget, "budget_ms": budget_ms,
            "keep": tuple(keep or ()), "table": str(table) if table else None,
            "calibration": calibration, "eval_device": eval_device, "rescore": rescore,
            "quality_floor": quality_floor, "space": space}


@app.command()
def search(
    model: ModelArg,
    device: Annotated[str, typer.Option(help="device whose latency the search lowers")]
    = "iphone14pro-ane",
    budget: BudgetOpt = None,
    budget_ms: BudgetMsOpt = None,
    keep: KeepOpt = None,
    table: TableOpt = None,
    calibration: CalibrationOpt = 8,
    eval_device: EvalDeviceOpt = "cpu",
    rescore: Annotated[bool, typer.Option(
        "--rescore/--score-once", help="re-score the remaining blocks after each removal")]
    = True,
    quality_floor: Annotated[float | None, typer.Option(
        help="stop before the proxy loss (NMSE) passes this")] = None,
    proxy_space: SpaceOpt = "eps",
    output: Annotated[Path, typer.Option("--output", "-o", help="search record JSON (the PNG "
                                         "front goes next to it)")] = Path("search.json"),
    latent: LatentOpt = None,
    batch: BatchOpt = 1,
    arch: ArchOpt = None,
) -> None:
    """Search which blocks to remove for a latency budget on a device; print the front."""
    from snapc.compiler import load_graph, random_weights_warning
    from snapc.passes import SearchBlocks
    from snapc.pipeline import PassContext
    from snapc.search_report import front_table, plot_front, search_table

    args = _search_args(device, budget, budget_ms, keep, table, calibration, eval_device,
                        rescore, quality_floor, proxy_space)
    try:
        search_pass = SearchBlocks(**args)
        search_pass.check()  # device, budget, table: before loading the model
        if not output.parent.is_dir():
            raise SnapcError(f"cannot write {output}: folder {output.parent} does not exist; "
                             "create it or give another -o")
        with RichReporter(err) as reporter:
            reporter.stage(f"loading and tracing {model}")
            graph = load_graph(model, arch=arch, batch=batch, latent=latent)
            if graph.source.random_weights:
                reporter.warn(random_weights_warning(graph.source.name))
            result = search_pass.run(graph, PassContext(options={"progress": reporter.stage}))
    except SnapcError as exc:
        fail(exc)
    record = result.info["search"]
    with atomic_output_file(output) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    chart = plot_front(record, output.with_suffix(".png"))
    out.print(search_table(record))
    out.print(front_table(record))
    out.print(f"chosen: {', '.join(record['chosen']) or 'nothing'}")
    out.print(f"wrote {output} and {chart}")


@app.command()
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    latent: LatentOpt = None,
    batch: BatchOpt = 1,
    arch: ArchOpt = None,
) -> None:
    """Print the block map of MODEL: every removable block with its cost, and totals."""
    from snapc.compiler import load_graph, random_weights_warning
    from snapc.inspect import block_report

    try:
        from snapc.models import MODELS

        # registered names build on the meta device (shapes-family weights load on the CPU)
        graph = load_graph(model, arch=arch, batch=batch, latent=latent,
                           device="meta" if model in MODELS and arch is None else "cpu")
    except SnapcError as exc:
        fail(exc)
    report = block_report(graph)
    if graph.source.random_weights:
        err.print(f"[yellow]warning:[/] {random_weights_warning(graph.source.name)}")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    from snapc.inspect import render_block_table

    out.print(render_block_table(report))


@app.command()
def passes() -> None:
    """List the built-in passes."""
    import snapc.passes  # noqa: F401  (registers the built-in passes)
    from snapc.pipeline import PASSES

    table = Table(title="snapc passes")
    for col in ("name", "level", "what it does"):
        table.add_column(col)
    for name, factory in sorted(PASSES.items()):
        doc = " ".join((factory.__doc__ or "").split())
        table.add_row(name, str(getattr(factory, "level", "")), doc)
    out.print(table)


@app.command()
def targets() -> None:
    """List the targets `snapc compile --target` accepts."""
    from snapc.targets import TARGETS

    table = Table(title="snapc targets")
    table.add_column("name")
    table.add_column("what it emits")
    for name, entry in TARGETS.items():
        table.add_row(name, entry.description)
    out.print(table)


@app.command()
def models() -> None:
    """List the registered model names."""
    from snapc.models import MODELS

    table = Table(title="snapc models")
    table.add_column("name")
    table.add_column("description")
    for name, spec in MODELS.items():
        table.add_row(name, spec.description)
    out.print(table)


def _register_profile_commands() -> None:
    from snapc.cli_evaluate import evaluate_command
    from snapc.cli_profile import cost_command, profile_command

    app.command("profile")(profile_command)
    app.command("cost")(cost_command)
    app.command("evaluate")(evaluate_command)


_register_profile_commands()


def _register_train_commands() -> None:
    from snapc.cli_train import distill_command

    app.command("distill")(distill_command)


_register_train_commands()


def _register_generate_command() -> None:
    from snapc.cli_generate import generate_command

    app.command("generate")(generate_command)


_register_generate_command()


def _register_decoder_command() -> None:
    from snapc.cli_decoder import compress_decoder_command

    app.command("compress-decoder")(compress_decoder_command)


_register_decoder_command()


def _register_tune_command() -> None:
    from snapc.cli_tune import tune_command

    app.command("tune")(tune_command)


_register_tune_command()


def main() -> None:
    """Entry point of the `snapc` console script."""
    app()
