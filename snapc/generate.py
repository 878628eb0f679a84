"""Text in, pictures out, through compiled components alone: the flow behind `snapc generate`.

An artifact folder written by ``snapc compile MODEL --components unet,text_encoder[,vae_decoder]``
(see :mod:`snapc.components`) holds a top-level manifest with the components, the sampler and
the tokenizer. :func:`load_artifact` opens it (ONNX components on onnxruntime CPU, TVM ``x86``
components through TVM's Relax VM; runtimes start on first use), ``artifact.tokenize`` checks
and tokenizes prompts up front, :func:`generate` samples one image per prompt with the
manifest's sampler and :func:`write_images` writes one PNG per prompt, a grid PNG and
results.json into an output folder atomically.

Two kinds of artifact: shapes-family ones sample in pixel space with snapc's DDIM
(:func:`snapc.shapes.sampler.sample`) and each result says whether the picture matches its
prompt as decoded (:func:`snapc.shapes.data.decode`); pipeline ones (CLIP text encoder, UNet,
VAE decoder) sample latents with diffusers' ``DDIMScheduler`` on the manifest's noise schedule
and the compiled VAE decoder turns them into the picture.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from snapc.errors import SnapcError, ToolMissingError, WeightsError
from snapc.shapes.sampler import SamplerSpec

__all__ = ["GenerateArtifact", "load_artifact", "check_prompts", "read_prompts",
           "generate", "write_images", "RUNNABLE_TARGETS"]

_RECOMPILE = "snapc compile MODEL --target onnx --components unet,text_encoder -o DIR"
RUNNABLE_TARGETS = ("onnx", "x86")  # onnxruntime CPU; TVM's x86 build through its VM


@dataclass(frozen=True)
class GenerateArtifact:
    """A components artifact ready to run: the UNet denoiser, the text encoder, the sampler.

    ``unet(sample, timestep, context)`` takes any batch (calls are chunked to the compiled
    batch); ``encode(tokens)`` returns (B, L, D) contexts of (B, L) token ids;
    ``tokenize(prompts)`` returns those ids, raising SnapcError for a prompt the tokenizer
    cannot take (``tokenize_unchecked``: for the empty unconditional prompt);
    ``decode(latents)`` (pipelines) returns images in [-1, 1]. ``latent`` is (channels, size)
    of a latent-space pipeline, None for pixel-space shapes artifacts; ``schedule`` its
    diffusers DDIMScheduler arguments.
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
    tokenize: Callable[[Sequence[str]], torch.Tensor] = field(default=lambda p: check_prompts(p))
    tokenize_unchecked: Callable[[Sequence[str]], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    latent: tuple[int, int] | None = None
    schedule: dict[str, Any] | None = None
    runtime: str = "onnxruntime-cpu"


class _Lazy:
    """A component runtime made on its first call (loading is checked before anything runs,
    the weights only when needed)."""

    def __init__(self, make: Callable[[], Callable[..., torch.Tensor]]) -> None:
        self.make, self.function = make, None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.function is None:
            self.function = self.make()
        return self.function(*inputs)


def _component(manifest: dict[str, Any], name: str, folder: Path) -> _Lazy | None:
    """Return the runtime of component ``name`` (None when the artifact has none); raise
    WeightsError when its files are missing."""
    from snapc.runtime import OnnxFunction, TvmFunction

    for entry in manifest.get("components", []):
        if entry.get("name") != name:
            continue
        batch, names = int(entry["batch"]), [i["name"] for i in entry["inputs"]]
        files = {k: folder / v for k, v in entry["files"].items()}
        needed = ("model",) if manifest["target"] == "onnx" else ("library", "params")
        for key in needed:
            if key not in files or not files[key].is_file():
                raise WeightsError(f"{files.get(key, folder / name)} is missing; re-run "
                                   f"{_RECOMPILE}")
        if manifest["target"] == "onnx":
            return _Lazy(partial(OnnxFunction, files["model"], names, batch))
        sub = _read_json(folder / entry["manifest"])
        try:
            tvm_info = sub["extra"]["tvm"]
            order, entry_fn = list(tvm_info["param_order"]), str(tvm_info["entry"])
        except (KeyError, TypeError) as exc:
            raise WeightsError(f"corrupt {folder / entry['manifest']} (no extra.tvm {exc}); "
                               "re-run snapc compile") from exc
        return _Lazy(partial(TvmFunction, files["library"], files["params"], order, batch,
                             entry_fn))
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"corrupt or missing {path} ({exc}); re-run snapc compile") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"corrupt {path}: not a JSON object; re-run snapc compile")
    return data


def _check_runtime(target: str, folder: Path) -> None:
    if target.startswith("coreml"):
        where = "" if platform.system() == "Darwin" else f", and this is {platform.system()}"
        raise SnapcError(f"{folder} is a Core ML artifact: Core ML runs only on macOS{where}; "
                         "snapc generate needs macOS for it, or compile with --target onnx")
    if target not in RUNNABLE_TARGETS:
        raise SnapcError(f"{folder} is a '{target}' artifact, which does not run on this CPU; "
                         "snapc generate runs onnx (onnxruntime) and x86 (TVM) artifacts: "
                         f"{_RECOMPILE}")


def _require_runtime(target: str) -> str:
    """Raise ToolMissingError when the runtime of ``target`` is not installed; return its
    name."""
    module, fix = (("onnxruntime", "pip install onnxruntime") if target == "onnx"
                   else ("tvm", "pip install 'snapc[tvm]'"))
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ToolMissingError(f"snapc generate needs {module} for a '{target}' artifact "
                               f"({exc}); {fix}") from exc
    return "onnxruntime-cpu" if target == "onnx" else "tvm-x86-vm"


class _ClipTokens:
    """The prompt tokenizer of a pipeline artifact: its saved CLIP tokenizer (loaded on first
    use) at the text encoder's length. Calling it checks prompts (not empty, not longer than
    the encoder takes); :meth:`unchecked` tokenizes any text (the empty unconditional one)."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.where = folder / str(info.get("folder", "tokenizer"))
        if not self.where.is_dir():
            raise WeightsError(f"{self.where} is missing (the tokenizer); re-run snapc compile "
                               "with --components unet,text_encoder,...")
        self.length = int(info["max_tokens"])
        self.tokenizer: Any = None

    def unchecked(self, prompts: Sequence[str]) -> torch.Tensor:
        """Return (N, length) token ids of ``prompts``, padded (too long ones still refused)."""
        from snapc.clip_text import tokenize

        if self.tokenizer is None:
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(str(self.where),
                                                           local_files_only=True)
        return tokenize(self.tokenizer, prompts, self.length)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        _check_not_empty(prompts)
        return self.unchecked(prompts)


def load_artifact(path: str | Path) -> GenerateArtifact:
    """Open a components artifact folder; raise SnapcError (one line, naming the fix) for a
    folder that is no artifact, an artifact without a text encoder (or, in latent space,
    without a VAE decoder), or a target this machine cannot run. Runtimes start on first
    use."""
    from snapc.components import COMPONENTS_FORMAT
    from snapc.manifest import MANIFEST_NAME

    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SnapcError(f"{folder} is no snapc artifact (no {MANIFEST_NAME}); make one with "
                         f"{_RECOMPILE}")
    manifest = _read_json(manifest_path)
    if "target" not in manifest:
        raise WeightsError(f"corrupt {manifest_path} (no target); re-run snapc compile")
    target = str(manifest["target"])
    _check_runtime(target, folder)
    if manifest.get("format") != COMPONENTS_FORMAT:
        raise SnapcError(f"{folder} is a UNet-only artifact without a text encoder, so it "
                         f"cannot read a prompt; compile the text encoder too: {_RECOMPILE}")
    names = [c.get("name") for c in manifest.get("components", [])]
    for needed in ("text_encoder", "unet"):
        if needed not in names:
            raise SnapcError(f"{folder} has no {needed} component (it has "
                             f"{', '.join(map(str, names)) or 'none'}), so it cannot turn a "
                             f"prompt into a picture; re-run {_RECOMPILE}")
    setup = manifest.get("generate")
    if not isinstance(setup, dict) or not setup.get("tokenizer"):
        raise SnapcError(f"{folder} records no tokenizer; re-run {_RECOMPILE}")
    latent = setup.get("latent")
    if latent is not None and "vae_decoder" not in names:
        raise SnapcError(f"{folder} samples latents and has no vae_decoder component to turn "
                         "them into a picture; compile with --components "
                         "unet,text_encoder,vae_decoder")
    runtime = _require_runtime(target)
    try:
        sampler = SamplerSpec.from_json(manifest.get("sampler"))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"bad sampler in {manifest_path} ({exc}); re-run snapc compile") \
            from exc
    model = manifest.get("model", {})
    text = _component(manifest, "text_encoder", folder)
    unet = _component(manifest, "unet", folder)
    decoder = _component(manifest, "vae_decoder", folder) if latent is not None else None
    from snapc.families import is_shapes_family

    base = str(model.get("base") or model.get("name"))
    shapes = is_shapes_family(base) and latent is None
    if setup["tokenizer"].get("kind") == "shapes-words":
        from snapc.shapes.text import tokenize as shapes_tokenize

        tokenize, unchecked = check_prompts, shapes_tokenize
    else:
        tokenize = _ClipTokens(folder, setup["tokenizer"])
        unchecked = tokenize.unchecked
    return GenerateArtifact(
        path=folder, name=str(model.get("name")), base=base, sampler=sampler,
        unet=lambda x, t, c: unet(x.float(), t.float(), c.float()),
        encode=lambda tokens: text(tokens.long()),
        unconditional_prompt=str(setup.get("unconditional_prompt", "")),
        shapes=shapes, random_weights=bool(model.get("random_weights")),
        tokenize=tokenize, tokenize_unchecked=unchecked,
        decode=(lambda z: decoder(z.float()).clamp(-1, 1)) if decoder is not None else None,
        latent=(int(latent["channels"]), int(latent["size"])) if latent is not None else None,
        schedule=dict(setup.get("scheduler") or {}) or None, runtime=runtime)


def _check_not_empty(prompts: Sequence[str]) -> None:
    if not prompts:
        raise SnapcError("no prompts; give --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, text in enumerate(prompts, 1):
        if not text.split():
            raise SnapcError(f"prompt {i} is empty; give a caption such as 'a small red "
                             "circle at the top left'")


def check_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """Return the (N, MAX_TOKENS) token ids of prompts for the shapes word tokenizer; raise
    SnapcError naming the fix for no prompts, a prompt longer than the tokenizer takes, or a
    word it does not know."""
    from snapc.shapes.text import MAX_TOKENS, VOCAB, tokenize

    _check_not_empty(prompts)
    for i, text in enumerate(prompts, 1):
        words = text.split()
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


def _sample_latents(artifact: GenerateArtifact, unet: Callable[..., torch.Tensor],
                    context: torch.Tensor, uncond: torch.Tensor | None, spec: SamplerSpec,
                    noise: torch.Tensor) -> torch.Tensor:
    """Return the latents DDIM (diffusers' DDIMScheduler, eta 0, on the artifact's noise
    schedule) samples from ``noise`` for one prompt, CFG halves in one UNet call."""
    from diffusers import DDIMScheduler

    schedule = {k: v for k, v in (artifact.schedule or {}).items() if k != "class"}
    scheduler = DDIMScheduler(**schedule, timestep_spacing=spec.spacing)
    scheduler.set_timesteps(spec.steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        step = torch.full((x.shape[0],), float(t))
        if uncond is None:
            eps = unet(x, step, context)
        else:
            both = unet(torch.cat([x, x]), torch.cat([step, step]), torch.cat([uncond, context]))
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + spec.guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
    return x


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
    the unconditional and conditional halves go in one batch). Pipeline artifacts sample
    latents and decode them with their compiled VAE decoder.
    Records hold the prompt, seconds and, for shapes artifacts, the decoded match.
    """
    import time

    from snapc.evaluation import resolve_sampler
    from snapc.shapes.data import decode, match_score
    from snapc.shapes.sampler import sample

    spec = resolve_sampler(artifact.sampler, steps=steps, guidance=guidance)
    if guidance is not None and guidance < 0:
        raise SnapcError(f"--guidance must be >= 0, not {guidance:g}")
    tokens = artifact.tokenize(prompts)
    guided = not spec.guidance_embedded and spec.guidance != 1.0
    unchecked = artifact.tokenize_unchecked or _shapes_tokens
    uncond = artifact.encode(unchecked([artifact.unconditional_prompt])) if guided else None
    channels, size = artifact.latent or (3, 32)
    noise = torch.randn(len(prompts), channels, size, size,
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
        if artifact.latent is None:
            x = sample(counted, context, uncond, steps=spec.steps, guidance=spec.guidance,
                       noise=noise[i : i + 1], batch_cfg=True, spacing=spec.spacing,
                       guidance_embedded=spec.guidance_embedded,
                       alpha_floor=spec.alpha_floor)
        else:
            latents = _sample_latents(artifact, counted, context, uncond, spec,
                                      noise[i : i + 1])
            x = artifact.decode(latents)
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


def _shapes_tokens(prompts: Sequence[str]) -> torch.Tensor:
    from snapc.shapes.text import tokenize

    return tokenize(list(prompts))


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
