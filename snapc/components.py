"""Compile a model's components (UNet, text encoder, VAE decoder) into one artifact folder.

`snapc compile MODEL --components unet,text_encoder,vae_decoder -o OUT` builds::

    OUT/manifest.json          components, sampler, tokenizer, unconditional prompt, schedule
    OUT/unet/                  the UNet artifact (its own manifest.json), as `snapc compile`
    OUT/text_encoder/          the text encoder artifact (its own manifest.json)
    OUT/tokenizer/             a pipeline's CLIP tokenizer (save_pretrained), for generate
    OUT/vae_decoder/           the VAE decoder artifact: latents in, image out (its manifest
                               holds the decoder's block map)

Each component goes through the passes that apply to it and is verified against PyTorch by
its target's export; the whole folder appears only when every component verified. The UNet is
compiled at twice the batch under classifier-free guidance (unconditional and conditional
halves in one call); the top-level manifest records each component's batch.

Text encoders: shapes-family models (``shapes``, ``shapes-*``, pruned folders of a shapes base:
:class:`snapc.shapes.text.TextEncoder`) and pipelines (CLIP, :mod:`snapc.pipeline_models`:
the named ``sd15-pipeline`` / ``tiny-pipeline`` and diffusers pipeline folders). VAE decoders:
pipelines (:mod:`snapc.vae`); shapes samples in pixel space and has none.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapc.artifacts import atomic_output_dir
from snapc.compiler import (
    CompileOptions,
    CompileResult,
    NullReporter,
    Reporter,
    check_options,
    compile_model,
    quantization_to_manifest,
)
from snapc.errors import SnapcError
from snapc.manifest import MANIFEST_NAME

__all__ = ["COMPONENTS", "COMPONENTS_FORMAT", "ComponentsResult", "parse_components",
           "compile_components"]

COMPONENTS = ("unet", "text_encoder", "vae_decoder")
COMPONENTS_FORMAT = "snapc-components/1"
_PASSES_FOR_TEXT = ("quantize",)  # block removal, search and UNet fusions do not apply
TOKENIZER_FOLDER = "tokenizer"
_TEXT_PROMPT = "a photo of a cat"  # 6 tokens: fits the tiny 16-token encoder too


@dataclass(frozen=True)
class ComponentsResult:
    """The top-level manifest written and each component's compile result."""

    manifest: dict[str, Any]
    results: dict[str, CompileResult]
    timings: dict[str, float]


def parse_components(text: str) -> tuple[str, ...]:
    """Return the component names of a comma-separated list, in compile order (unet first).

    Raises SnapcError naming the valid components for an unknown or repeated name.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SnapcError(f"--components is empty; give some of {', '.join(COMPONENTS)}")
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise SnapcError(f"unknown component '{unknown[0]}'; valid: {', '.join(COMPONENTS)}")
    if len(set(names)) != len(names):
        raise SnapcError(f"--components {text}: a component is named twice")
    return tuple(n for n in COMPONENTS if n in names)


def _is_shapes(info: Any) -> bool:
    from snapc.families import is_shapes_family

    return is_shapes_family(info.base or info.name)


def _check_sources(info: Any, model: str, components: Sequence[str]) -> None:
    """Raise SnapcError (one line, naming the fix) when ``model`` lacks a component asked for:
    shapes-family models have a text encoder and no VAE (pixel space); pipelines (named or
    folders) need the sub-folders of each component; other UNets have neither."""
    from snapc.pipeline_models import PIPELINES, is_pipeline, require_component

    wanted = [c for c in components if c != "unet"]
    if _is_shapes(info):
        if "vae_decoder" in wanted:
            raise SnapcError(f"model '{model}' samples in pixel space and has no VAE; drop "
                             "vae_decoder from --components")
        return
    for component in wanted:
        if not is_pipeline(model):
            raise SnapcError(f"model '{model}' has no {component.replace('_', ' ')} snapc can "
                             f"compile (text encoders: shapes-family models and pipelines; VAE "
                             f"decoders: pipelines such as {', '.join(PIPELINES)} or a pipeline "
                             f"folder with vae/); drop {component} from --components")
        if model not in PIPELINES:  # a folder: the sub-folders must be there
            require_component(model, component)


def _compile_graph(name: str, graph: Any, passes: list[Any], options: CompileOptions,
                   out: Path, reporter: Reporter, extra: dict[str, Any]) -> CompileResult:
    """Run ``passes`` over a component's ``graph``, export it for ``options.target`` into
    ``out`` (atomically; the target verifies it against PyTorch) and return the result."""
    from snapc.pipeline import PassContext, Pipeline
    from snapc.targets import get_target

    timings: dict[str, float] = {}
    start = time.perf_counter()
    result = Pipeline(passes).run(graph, PassContext(check=True, verify=bool(passes)))
    timings["passes"] = time.perf_counter() - start
    entry = get_target(options.target)
    export, _ = entry.load()
    target_options = entry.make_options(**options.target_options)
    reporter.stage(f"{name}: emit {options.target}")
    start = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        manifest = export(result.graph, tmp, target_options)
        manifest.passes = [r.to_json() for r in result.records]
        quantization_to_manifest(manifest)
        manifest.sampler = None
        manifest.extra["component"] = name
        manifest.extra.update(extra)
        if graph.source.random_weights:
            from snapc.compiler import random_weights_warning

            manifest.notes.append(random_weights_warning(graph.source.name))
        timings["emit"] = time.perf_counter() - start
        manifest.extra["compile_timings"] = {k: round(v, 2) for k, v in timings.items()}
        manifest.write(tmp)
    reporter.done(f"{name}: emit {options.target}", timings["emit"], str(out))
    return CompileResult(manifest, result.graph, result, timings)


def _traced(reporter: Reporter, name: str, make: Any) -> tuple[Any, float]:
    reporter.stage(f"{name}: trace")
    start = time.perf_counter()
    graph = make()
    seconds = time.perf_counter() - start
    counts = graph.blocks.counts()
    reporter.done(f"{name}: trace", seconds, f"{len(graph.fx.nodes)} nodes, "
                  f"{counts.get('resnet', 0)} ResNet, {counts.get('transformer', 0)} "
                  "attention blocks")
    return graph, seconds


def _component_info(info: Any, name: str, random_weights: bool) -> Any:
    from snapc.graph import ModelInfo

    return ModelInfo(name=f"{info.name}/{name}", random_weights=random_weights,
                     base=info.base or info.name)


def _compile_text_encoder(options: CompileOptions, info: Any, out: Path,
                          reporter: Reporter, parts: Any = None) -> CompileResult:
    """Trace the text encoder (shapes', or a pipeline's CLIP given as ``parts``) on one
    prompt, run the applicable passes (quantization), export and verify it into ``out``."""
    from snapc.compiler import default_passes

    if parts is None:  # the shapes text encoder
        from snapc.frontend import trace
        from snapc.shapes.model import load_text_encoder
        from snapc.shapes.text import tokenize

        module = load_text_encoder()
        tokens = tokenize(["a small red circle at the top left and a large blue square at "
                           "the bottom right"])
        source = _component_info(info, "text_encoder", info.random_weights)
        graph, seconds = _traced(reporter, "text_encoder", lambda: trace(
            module, (tokens,), source, input_names=["input_ids"]))
        role = "encoder_hidden_states (B, MAX_TOKENS, TEXT_DIM)"
    else:
        from snapc.clip_text import tokenize, trace_text_encoder

        tokens = tokenize(parts.tokenizer, [_TEXT_PROMPT], parts.max_length)
        source = _component_info(info, "text_encoder", parts.random_weights)
        graph, seconds = _traced(reporter, "text_encoder", lambda: trace_text_encoder(
            parts.module, tokens, source))
        role = "encoder_hidden_states (B, max_length, hidden_size): CLIP last hidden state"
    passes = [p for p in default_passes(options) if p.name in _PASSES_FOR_TEXT]
    if parts is not None:  # CLIP: calibrate on prompts of its own tokenizer
        passes = [_calibrated(p, parts) for p in passes]
    extra: dict[str, Any] = {"output_role": role}
    result = _compile_graph("text_encoder", graph, passes, options, out, reporter, extra)
    result.timings["trace"] = seconds
    return result


def _calibrated(quantize: Any, parts: Any) -> Any:
    """Return the Quantize pass ``quantize`` with its calibration set: token ids of
    ``quantize.calibration`` seeded prompts (snapc.clip_text.calibration_tokens) for the CLIP
    text encoder of ``parts``; the observers cannot make token ids from the graph alone."""
    from snapc.clip_text import calibration_tokens

    tokens = calibration_tokens(parts.tokenizer, quantize.calibration, parts.max_length,
                                quantize.seed)
    return dataclasses.replace(quantize, inputs=(tokens,))


def _decoder_passes(options: CompileOptions) -> list[Any]:
    """Return the compile passes that apply to a VAE decoder: fusions (with their lowering)
    and quantization; block removal and search name UNet blocks and are left out."""
    from snapc.compiler import default_passes
    from snapc.passes import RemoveBlocks, SearchBlocks

    return [p for p in default_passes(options) if not isinstance(p, (RemoveBlocks, SearchBlocks))]


def _compile_vae_decoder(options: CompileOptions, info: Any, vae: Any, random_weights: bool,
                         latent: int, out: Path, reporter: Reporter) -> CompileResult:
    """Trace the VAE decoder at ``options.batch`` x ``latent``^2 latents, run its passes
    (fusion, quantization), export and verify it into ``out``."""
    from snapc.vae import decoder_example_inputs, trace_decoder

    inputs = decoder_example_inputs(vae, options.batch, latent, options.seed)
    source = _component_info(info, "vae_decoder", random_weights)
    graph, seconds = _traced(reporter, "vae_decoder", lambda: trace_decoder(vae, inputs, source))
    block_map = {"counts": graph.blocks.counts(),
                 "blocks": [{k: v for k, v in b.to_json().items()
                             if k in ("name", "kind", "stage", "resolution", "in_channels",
                                      "out_channels", "params", "macs", "removable")}
                            for b in graph.blocks]}
    extra = {"output_role": "image (B, 3, H, W) in [-1, 1]", "block_map": block_map,
             "scaling_factor": float(vae.config.scaling_factor)}
    result = _compile_graph("vae_decoder", graph, _decoder_passes(options), options, out,
                            reporter, extra)
    result.timings["trace"] = seconds
    return result


def _entry(name: str, result: CompileResult, role: str) -> dict[str, Any]:
    manifest = result.manifest
    return {
        "name": name,
        "folder": name,
        "manifest": f"{name}/{MANIFEST_NAME}",
        "files": {k: f"{name}/{v}" for k, v in manifest.files.items()},
        "batch": int(manifest.inputs[0].shape[0]),
        "inputs": [s.to_json() for s in manifest.inputs],
        "outputs": [s.to_json() for s in manifest.outputs],
        "output_role": role,
        "verification": {k: manifest.verification.get(k)
                         for k in ("passed", "psnr_db", "max_abs", "min_psnr_db")},
    }


def _unet_shape(model: str, options: CompileOptions) -> tuple[int, int, int, int]:
    """Return (latent channels, latent size, context length, context width) of the UNet."""
    from snapc.models import load_model

    loaded = load_model(model, arch=options.arch, latent=options.latent, seed=options.seed,
                        device="meta")
    sample, _, context = loaded.example_inputs[:3]
    return (int(loaded.module.config.out_channels), int(sample.shape[-1]),
            int(context.shape[1]), int(context.shape[2]))


def _load_pipeline_parts(options: CompileOptions, components: Sequence[str]
                         ) -> dict[str, Any]:
    """Load a pipeline's text encoder and VAE (those asked for) and check they fit its UNet;
    raise SnapcError (one line) before anything is compiled when they do not."""
    from snapc.pipeline_models import load_text_encoder, load_vae

    channels, latent, length, width = _unet_shape(options.model, options)
    parts: dict[str, Any] = {"latent": latent, "context": (length, width)}
    if "text_encoder" in components:
        text = load_text_encoder(options.model, options.seed)
        hidden = int(text.module.config.hidden_size)
        if (text.max_length, hidden) != (length, width):
            raise SnapcError(f"the text encoder of '{options.model}' gives {text.max_length} x "
                             f"{hidden} states, its UNet takes {length} x {width}; the pipeline "
                             "does not fit together (check text_encoder/config.json)")
        parts["text"] = text
    if "vae_decoder" in components:
        vae, random_weights = load_vae(options.model, options.seed)
        if int(vae.config.latent_channels) != channels:
            raise SnapcError(f"the VAE of '{options.model}' decodes {vae.config.latent_channels}"
                             f"-channel latents, its UNet makes {channels}; the pipeline does "
                             "not fit together (check vae/config.json)")
        parts["vae"], parts["vae_random"] = vae, random_weights
    return parts


def compile_components(
    options: CompileOptions,
    components: Sequence[str],
    reporter: Reporter | None = None,
) -> ComponentsResult:
    """Compile ``components`` of ``options.model`` into sub-folders of ``options.out``.

    ``options`` are the UNet's compile options; its batch is the prompts per call, so under
    CFG the UNet is compiled at twice it. The text encoder gets the passes that apply to a
    non-UNet module (quantization), the VAE decoder fusion and quantization (not block
    removal or search, which name UNet blocks). The folder appears only when every component
    verified; raises SnapcError (one line) before compiling anything for a model without a
    component asked for, or a pipeline whose parts do not fit together.
    """
    from snapc.models import load_model
    from snapc.shapes.sampler import SamplerSpec

    reporter = reporter or NullReporter()
    components = parse_components(",".join(components))
    check_options(options)
    start = time.perf_counter()
    info = load_model(options.model, arch=options.arch, latent=options.latent,
                      seed=options.seed, device="meta").info
    try:
        sampler = SamplerSpec.from_json(info.sampler)
    except (TypeError, ValueError) as exc:
        raise SnapcError(f"bad sampler record of model '{options.model}': {exc}") from exc
    _check_sources(info, options.model, components)  # before compiling anything
    shapes = _is_shapes(info)
    parts = {} if shapes or components == ("unet",) else _load_pipeline_parts(options,
                                                                             components)
    cfg_batched = not sampler.guidance_embedded and sampler.guidance != 1.0
    results: dict[str, CompileResult] = {}
    timings: dict[str, float] = {}
    with atomic_output_dir(options.out, options.force) as tmp:
        entries = []
        if "unet" in components:
            unet_options = dataclasses.replace(
                options, out=tmp / "unet", force=False,
                batch=options.batch * (2 if cfg_batched else 1))
            t0 = time.perf_counter()
            results["unet"] = compile_model(unet_options, reporter=reporter)
            timings["unet"] = time.perf_counter() - t0
            entries.append(_entry("unet", results["unet"], "noise_pred"))
        if "text_encoder" in components:
            t0 = time.perf_counter()
            results["text_encoder"] = _compile_text_encoder(
                options, info, tmp / "text_encoder", reporter, parts.get("text"))
            timings["text_encoder"] = time.perf_counter() - t0
            entries.append(_entry("text_encoder", results["text_encoder"],
                                  "encoder_hidden_states"))
            if "text" in parts:
                parts["text"].tokenizer.save_pretrained(tmp / TOKENIZER_FOLDER)
        if "vae_decoder" in components:
            t0 = time.perf_counter()
            results["vae_decoder"] = _compile_vae_decoder(
                options, info, parts["vae"], parts["vae_random"], parts["latent"],
                tmp / "vae_decoder", reporter)
            timings["vae_decoder"] = time.perf_counter() - t0
            entries.append(_entry("vae_decoder", results["vae_decoder"], "image"))
        manifest = _top_manifest(options, info, entries, sampler, cfg_batched, parts)
        timings["total"] = time.perf_counter() - start
        manifest["compile_timings"] = {k: round(v, 2) for k, v in timings.items()}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return ComponentsResult(manifest, results, timings)


# Stable Diffusion 1.x's noise schedule (its scheduler/scheduler_config.json), used by a named
# pipeline and by a pipeline folder without scheduler/.
SD_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085,
                               "beta_end": 0.012, "beta_schedule": "scaled_linear",
                               "prediction_type": "epsilon", "steps_offset": 1,
                               "set_alpha_to_one": False, "clip_sample": False}


def _schedule(model: str) -> dict[str, Any]:
    """Return the noise schedule of a pipeline: its scheduler/ config's schedule fields, else
    Stable Diffusion 1.x's."""
    path = Path(model) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(SD_SCHEDULE)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SnapcError(f"corrupt {path}: {exc}; re-save the pipeline") from exc
    return {k: config.get(k, v) for k, v in SD_SCHEDULE.items()}


def _top_manifest(options: CompileOptions, info: Any, entries: list[dict[str, Any]],
                  sampler: Any, cfg_batched: bool, parts: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": COMPONENTS_FORMAT,
        "target": options.target,
        "model": {"name": info.name, "base": info.base or info.name,
                  "random_weights": info.random_weights,
                  "removed_blocks": list(info.removed)},
        "components": entries,
        "sampler": sampler.to_json(),
        "unet_cfg_batched": cfg_batched,
    }
    if _is_shapes(info):
        from snapc.shapes.text import MAX_TOKENS, TEXT_DIM

        manifest["generate"] = {
            "tokenizer": {"kind": "shapes-words", "function": "snapc.shapes.text.tokenize",
                          "max_tokens": MAX_TOKENS},
            "unconditional_prompt": "",
            "context_dim": TEXT_DIM,
            "image": {"space": "pixel", "channels": 3, "size": 32, "range": [-1, 1]},
            "decoder": "snapc.shapes.data.decode",
        }
    elif parts:
        from snapc.vae import vae_scale

        length, width = parts["context"]
        generate: dict[str, Any] = {
            "tokenizer": ({"kind": "clip", "folder": TOKENIZER_FOLDER, "max_tokens": length}
                          if "text" in parts else None),
            "unconditional_prompt": "",
            "context_dim": width,
            "latent": {"channels": int(info.config["in_channels"]), "size": parts["latent"]},
            "scheduler": {"class": "diffusers.DDIMScheduler", **_schedule(options.model)},
        }
        if "vae" in parts:
            size = parts["latent"] * vae_scale(parts["vae"])
            generate["image"] = {"space": "latent", "channels": 3, "size": size,
                                 "range": [-1, 1], "decoder": "vae_decoder"}
        manifest["generate"] = generate
    return manifest
