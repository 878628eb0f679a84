"""Compile a model's components (UNet, text encoder) into one artifact folder.

`snapc compile MODEL --components unet,text_encoder -o OUT` builds::

    OUT/manifest.json          components, sampler, tokenizer, unconditional prompt
    OUT/unet/                  the UNet artifact (its own manifest.json), as `snapc compile`
    OUT/text_encoder/          the text encoder artifact (its own manifest.json)

Each component goes through the passes that apply to it and is verified against PyTorch by
its target's export; the whole folder appears only when every component verified. The UNet is
compiled at twice the batch under classifier-free guidance (unconditional and conditional
halves in one call); the top-level manifest records each component's batch.

Only shapes-family models (``shapes``, ``shapes-*``, pruned folders of a shapes base) have a
text encoder snapc can compile (:class:`snapc.shapes.text.TextEncoder`).
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
)
from snapc.errors import SnapcError
from snapc.manifest import MANIFEST_NAME

__all__ = ["COMPONENTS", "COMPONENTS_FORMAT", "ComponentsResult", "parse_components",
           "compile_components"]

COMPONENTS = ("unet", "text_encoder")
COMPONENTS_FORMAT = "snapc-components/1"
_PASSES_FOR_TEXT = ("quantize",)  # block removal, search and UNet fusions do not apply


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


def _check_text_encoder(info: Any, model: str) -> None:
    from snapc.models import is_shapes_family

    if not is_shapes_family(info.base or info.name):
        raise SnapcError(f"model '{model}' has no text encoder snapc can compile (text "
                         "encoders: shapes-family models); drop text_encoder from --components")


def _text_encoder_module(info: Any, model: str) -> Any:
    from snapc.shapes.model import load_text_encoder

    _check_text_encoder(info, model)

    return load_text_encoder()


def _compile_text_encoder(options: CompileOptions, info: Any, out: Path,
                          reporter: Reporter) -> CompileResult:
    """Trace the shapes text encoder on one caption, run the applicable passes, export and
    verify it into ``out`` (atomically)."""
    from snapc.compiler import default_passes
    from snapc.frontend import trace
    from snapc.graph import ModelInfo
    from snapc.pipeline import PassContext, Pipeline
    from snapc.shapes.text import tokenize
    from snapc.targets import get_target

    module = _text_encoder_module(info, options.model)
    timings: dict[str, float] = {}
    reporter.stage("text_encoder: trace")
    start = time.perf_counter()
    tokens = tokenize(["a small red circle at the top left and a large blue square at the "
                       "bottom right"])
    source = ModelInfo(name=f"{info.name}/text_encoder", random_weights=info.random_weights,
                       base=info.base or info.name)
    graph = trace(module, (tokens,), source, input_names=["input_ids"])
    timings["trace"] = time.perf_counter() - start
    reporter.done("text_encoder: trace", timings["trace"], f"{len(graph.fx.nodes)} nodes")
    passes = [p for p in default_passes(options) if p.name in _PASSES_FOR_TEXT]
    start = time.perf_counter()
    result = Pipeline(passes).run(graph, PassContext(check=True, verify=bool(passes)))
    timings["passes"] = time.perf_counter() - start
    entry = get_target(options.target)
    export, _ = entry.load()
    target_options = entry.make_options(**options.target_options)
    reporter.stage(f"text_encoder: emit {options.target}")
    start = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        manifest = export(result.graph, tmp, target_options)
        manifest.passes = [r.to_json() for r in result.records]
        manifest.sampler = None
        manifest.extra["component"] = "text_encoder"
        manifest.extra["output_role"] = "encoder_hidden_states (B, MAX_TOKENS, TEXT_DIM)"
        timings["emit"] = time.perf_counter() - start
        manifest.extra["compile_timings"] = {k: round(v, 2) for k, v in timings.items()}
        manifest.write(tmp)
    reporter.done(f"text_encoder: emit {options.target}", timings["emit"], str(out))
    return CompileResult(manifest, result.graph, result, timings)


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


def compile_components(
    options: CompileOptions,
    components: Sequence[str],
    reporter: Reporter | None = None,
) -> ComponentsResult:
    """Compile ``components`` of ``options.model`` into sub-folders of ``options.out``.

    ``options`` are the UNet's compile options; its batch is the prompts per call, so under
    CFG the UNet is compiled at twice it. The text encoder gets the passes that apply to a
    non-UNet module (quantization). The folder appears only when every component verified;
    raises SnapcError (one line) for a model without a text encoder asked for one.
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
    if "text_encoder" in components:
        _check_text_encoder(info, options.model)  # before compiling anything
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
            results["text_encoder"] = _compile_text_encoder(options, info, tmp / "text_encoder",
                                                            reporter)
            timings["text_encoder"] = time.perf_counter() - t0
            entries.append(_entry("text_encoder", results["text_encoder"],
                                  "encoder_hidden_states"))
        manifest = _top_manifest(options, info, entries, sampler, cfg_batched)
        timings["total"] = time.perf_counter() - start
        manifest["compile_timings"] = {k: round(v, 2) for k, v in timings.items()}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return ComponentsResult(manifest, results, timings)


def _top_manifest(options: CompileOptions, info: Any, entries: list[dict[str, Any]],
                  sampler: Any, cfg_batched: bool) -> dict[str, Any]:
    from snapc.models import is_shapes_family

    shapes = is_shapes_family(info.base or info.name)
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
    if shapes:
        from snapc.shapes.text import MAX_TOKENS, TEXT_DIM

        manifest["generate"] = {
            "tokenizer": {"kind": "shapes-words", "function": "snapc.shapes.text.tokenize",
                          "max_tokens": MAX_TOKENS},
            "unconditional_prompt": "",
            "context_dim": TEXT_DIM,
            "image": {"space": "pixel", "channels": 3, "size": 32, "range": [-1, 1]},
            "decoder": "snapc.shapes.data.decode",
        }
    return manifest
