"""Text in, pictures out, through compiled components alone: the flow behind `snapc generate`.

An artifact folder written by ``snapc compile MODEL --components unet,text_encoder`` (see
:mod:`snapc.components`) holds a top-level manifest with the components, the sampler and the
tokenizer. :func:`load_artifact` opens it (ONNX components on onnxruntime CPU),
:func:`check_prompts` tokenizes prompts up front, :func:`generate` samples one image per
prompt with the manifest's sampler (:func:`snapc.shapes.sampler.sample` over the compiled
UNet) and :func:`write_images` writes one PNG per prompt, a grid PNG and results.json into an
output folder atomically.

For shapes-derived artifacts each result says whether the picture matches its prompt as
decoded (:func:`snapc.shapes.data.decode` against the scene the prompt describes).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snapc.errors import SnapcError, ToolMissingError, WeightsError
from snapc.runtime import OnnxFunction
from snapc.shapes.sampler import SamplerSpec

__all__ = ["GenerateArtifact", "load_artifact", "check_prompts", "read_prompts",
           "generate", "write_images"]

_RECOMPILE = "snapc compile MODEL --target onnx --components unet,text_encoder -o DIR"


@dataclass(frozen=True)
class GenerateArtifact:
    """A components artifact ready to run: the UNet denoiser, the text encoder, the sampler.

    ``unet(sample, timestep, context)`` takes any batch (calls are chunked to the compiled
    batch); ``encode(tokens)`` returns (B, L, D) contexts of (B, MAX_TOKENS) token ids.
    """

    path: Path
    name: str
    base: str
    sampler: SamplerSpec
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]
    unconditional_prompt: str
    shapes: bool
    random_weights: bool


def _component(manifest: dict[str, Any], name: str, folder: Path) -> OnnxFunction | None:
    for entry in manifest.get("components", []):
        if entry.get("name") == name:
            model = folder / entry["files"]["model"]
            if not model.is_file():
                raise WeightsError(f"{model} is missing; re-run {_RECOMPILE}")
            return OnnxFunction(model, [i["name"] for i in entry["inputs"]],
                                int(entry["batch"]))
    return None


def _check_runtime(target: str, folder: Path) -> None:
    if target.startswith("coreml"):
        where = "" if platform.system() == "Darwin" else f", and this is {platform.system()}"
        raise SnapcError(f"{folder} is a Core ML artifact: Core ML runs only on macOS{where} "
                         "and snapc generate runs ONNX artifacts; compile with --target onnx")
    if target != "onnx":
        raise SnapcError(f"{folder} is a '{target}' artifact; snapc generate runs ONNX "
                         f"artifacts on onnxruntime: {_RECOMPILE}")


def load_artifact(path: str | Path) -> GenerateArtifact:
    """Open a components artifact folder; raise SnapcError (one line, naming the fix) for a
    folder that is no artifact, an artifact without a text encoder, or a target this machine
    cannot run."""
    from snapc.components import COMPONENTS_FORMAT
    from snapc.manifest import MANIFEST_NAME

    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SnapcError(f"{folder} is no snapc artifact (no {MANIFEST_NAME}); make one with "
                         f"{_RECOMPILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
        target = str(manifest["target"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(f"corrupt {manifest_path} ({exc}); re-run snapc compile") from exc
    _check_runtime(target, folder)
    if manifest.get("format") != COMPONENTS_FORMAT:
        raise SnapcError(f"{folder} is a UNet-only artifact without a text encoder, so it "
                         f"cannot read a prompt; compile the text encoder too: {_RECOMPILE}")
    names = [c.get("name") for c in manifest.get("components", [])]
    for needed in ("text_encoder", "unet"):
        if needed not in names:
            raise SnapcError(f"{folder} has no {needed} component (it has "
                             f"{', '.join(map(str, names)) or 'none'}); re-run {_RECOMPILE}")
    if "generate" not in manifest:
        raise SnapcError(f"{folder} records no tokenizer; re-run {_RECOMPILE}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ToolMissingError(f"snapc generate needs onnxruntime ({exc}); "
                               "pip install onnxruntime") from exc
    try:
        sampler = SamplerSpec.from_json(manifest.get("sampler"))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"bad sampler in {manifest_path} ({exc}); re-run snapc compile") \
            from exc
    model = manifest.get("model", {})
    text = _component(manifest, "text_encoder", folder)
    unet = _component(manifest, "unet", folder)
    from snapc.models import is_shapes_family

    base = str(model.get("base") or model.get("name"))
    return GenerateArtifact(
        path=folder, name=str(model.get("name")), base=base, sampler=sampler,
        unet=lambda x, t, c: unet(x.float(), t.float(), c.float()),
        encode=lambda tokens: text(tokens.long()),
        unconditional_prompt=str(manifest["generate"].get("unconditional_prompt", "")),
        shapes=is_shapes_family(base), random_weights=bool(model.get("random_weights")))


def check_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """Return the (N, MAX_TOKENS) token ids of prompts; raise SnapcError naming the fix for
    no prompts, a prompt longer than the tokenizer takes, or a word it does not know."""
    from snapc.shapes.text import MAX_TOKENS, VOCAB, tokenize

    if not prompts:
        raise SnapcError("no prompts; give --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, text in enumerate(prompts, 1):
        words = text.split()
        if not words:
            raise SnapcError(f"prompt {i} is empty; give a caption such as 'a small red "
                             "circle at the top left'")
        if len(words) > MAX_TOKENS:
            raise SnapcError(f"prompt {i} has {len(words)} words; the shapes tokenizer takes "
                             f"at most {MAX_TOKENS}: shorten {text!r}")
        unknown = sorted({w for w in words if w not in VOCAB[1:]})
        if unknown:
            raise SnapcError(f"prompt {i} has words the tokenizer does not know "
                             f"({', '.join(unknown)}); use only: {' '.join(VOCAB[1:])}")
    return tokenize(list(prompts))


def read_prompts(path: str | Path) -> list[str]:
    """Return the non-blank lines of a prompts file; raise SnapcError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise SnapcError(f"prompts file {path} not found; give a text file with one prompt "
                         "per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _expected(prompt: str) -> Any:
    from snapc.shapes.captions import parse_caption
    from snapc.shapes.data import objects_of

    try:
        return objects_of(parse_caption(prompt))
    except ValueError:
        return None


def _describe(objects: Sequence[Any]) -> str:
    from snapc.shapes.data import COLOURS, POSITIONS, SHAPES, SIZES

    return " and ".join(f"a {SIZES[o.size]} {COLOURS[o.colour]} {SHAPES[o.shape]} at the "
                        f"{POSITIONS[o.position]}" for o in objects) or "(nothing)"


@torch.no_grad()
def generate(
    artifact: GenerateArtifact,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Return (N, 3, H, W) images in [-1, 1], one per prompt, and a record per image.

    Start noise is drawn once for all N from ``seed`` (the `snapc evaluate` protocol), so
    image i depends only on (i, seed). steps / guidance override the manifest's sampler.
    progress(image, steps done, steps) is called after every step (one UNet call: under CFG
    the unconditional and conditional halves go in one batch).
    Records hold the prompt, seconds and, for shapes artifacts, the decoded match.
    """
    import time

    from snapc.evaluation import resolve_sampler
    from snapc.shapes.data import decode, match_score
    from snapc.shapes.sampler import sample
    from snapc.shapes.text import tokenize

    spec = resolve_sampler(artifact.sampler, steps=steps, guidance=guidance)
    if guidance is not None and guidance < 0:
        raise SnapcError(f"--guidance must be >= 0, not {guidance:g}")
    tokens = check_prompts(prompts)
    uncond = artifact.encode(tokenize([artifact.unconditional_prompt]))
    noise = torch.randn(len(prompts), 3, 32, 32,
                        generator=torch.Generator().manual_seed(seed + 1))
    images, records = [], []
    for i, prompt in enumerate(prompts):
        done = [0]

        def counted(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, i: int = i,
                    done: list[int] = done) -> torch.Tensor:
            out = artifact.unet(x, t, c)  # one call per step (CFG halves batched)
            done[0] += 1
            if progress is not None:
                progress(i, done[0], spec.steps)
            return out

        start = time.perf_counter()
        context = artifact.encode(tokens[i : i + 1])
        x = sample(counted, context, uncond, steps=spec.steps, guidance=spec.guidance,
                   noise=noise[i : i + 1], batch_cfg=True, spacing=spec.spacing,
                   guidance_embedded=spec.guidance_embedded)
        images.append(x)
        record: dict[str, Any] = {"prompt": prompt, "seconds": time.perf_counter() - start}
        if artifact.shapes:
            expected = _expected(prompt)
            found = decode(x)[0]
            record["decoded"] = _describe(found)
            if expected is None:
                record["matches"] = None
            else:
                hits, total = match_score(expected, found)
                record |= {"matches": hits == total, "attributes_matched": hits,
                           "attributes_counted": total}
        records.append(record)
    return torch.cat(images), records


def _to_uint8(images: torch.Tensor) -> Any:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_images(out: str | Path, images: torch.Tensor, records: list[dict[str, Any]], *,
                 force: bool = False, summary: dict[str, Any] | None = None,
                 grid_scale: int = 4) -> dict[str, Any]:
    """Write ``NNN.png`` per image, ``grid.png`` (upscaled ``grid_scale`` times) and
    ``results.json`` into ``out`` atomically; return the results object (records get their
    ``file``)."""
    from PIL import Image

    from snapc.artifacts import atomic_output_dir

    pixels = _to_uint8(images)
    n = len(pixels)
    cols = min(n, 10)
    rows = math.ceil(n / cols)
    h, w = pixels.shape[1:3]
    pad = 2
    grid = Image.new("RGB", (cols * (w * grid_scale + pad) + pad,
                             rows * (h * grid_scale + pad) + pad), (64, 64, 64))
    with atomic_output_dir(out, force) as tmp:
        for i, (px, record) in enumerate(zip(pixels, records, strict=True)):
            name = f"{i:03d}.png"
            image = Image.fromarray(px)
            image.save(tmp / name)
            record["file"] = name
            big = image.resize((w * grid_scale, h * grid_scale), Image.NEAREST)
            grid.paste(big, (pad + (i % cols) * (w * grid_scale + pad),
                             pad + (i // cols) * (h * grid_scale + pad)))
        grid.save(tmp / "grid.png")
        result = {**(summary or {}), "images": records, "grid": "grid.png"}
        (tmp / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
