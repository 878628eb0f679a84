"""Quality of the shapes-latent pipeline as a whole, decoder included, with any decoder.

What `snapc evaluate shapes-latent [--decoder DIR]` scores: the text encoder, latent UNet
sampling (:func:`snapc.shapes_latent.pipeline.generate`: DDIM with CFG on shapes' schedule,
start noise seeded per prompt index), the VAE decoder, then the 64x64 pictures averaged to
32x32 and scored with :mod:`snapc.quality`'s prompt adherence and Fréchet distance (against
renders of the same validation prompts). ``--decoder DIR`` replaces the pipeline's decoder
with another one (a compressed-decoder folder from ``snapc compress-decoder``, loaded by
:func:`snapc.decoder.load_compressed_vae`, or a plain AutoencoderKL folder): prompts, start
noise and UNet are the same, so the latents are the same and only the decoding differs.

The model is ``shapes-latent`` (the shipped weights, ``snapc/weights/shapes-latent``), any
folder of its layout (``vae/``, ``unet/``, ``text_encoder.safetensors``: what
``bench/train_shapes_latent.py --out DIR`` writes), or a pruned-UNet folder derived from it
(``snapc distill shapes-latent -o DIR``: its UNet with the shipped autoencoder and text
encoder).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.errors import SnapcError, WeightsError
from snapc.shapes.sampler import SamplerSpec

__all__ = ["LATENT_NAME", "LatentPipeline", "is_latent_model", "load_latent_pipeline",
           "load_decoder", "latent_images", "check_latent_request", "evaluate_latent"]

LATENT_NAME = "shapes-latent"
_PARTS = ("vae/config.json", "unet/config.json", "text_encoder.safetensors")
_TRAIN = "python bench/train_shapes_latent.py all --minutes M --train-device cuda"


@dataclass(frozen=True)
class LatentPipeline:
    """A shapes-latent pipeline ready to sample: autoencoder (its decoder is the one that
    decodes), latent UNet, text encoder, where each came from and the device they are on."""

    name: str
    vae: nn.Module
    unet: nn.Module
    text: nn.Module
    decoder: str  # "vae/" of the pipeline, or the --decoder folder
    device: str
    sampler: SamplerSpec = SamplerSpec()  # the stored sampler (the protocol's when none is)


def is_latent_model(model: str) -> bool:
    """Return whether MODEL is ``shapes-latent`` or a folder of its layout (any of vae/,
    unet/, text_encoder.safetensors without a diffusers model_index.json); reads no weights."""
    if model == LATENT_NAME:
        return True
    path = Path(model)
    if not path.is_dir() or (path / "model_index.json").is_file():
        return False
    base = _pruned_base(path)
    if base is not None:
        from snapc.families import is_latent_family

        return is_latent_family(base)
    return (path / "text_encoder.safetensors").is_file() or (
        (path / "vae" / "config.json").is_file() and (path / "training.json").is_file())


def _pruned_base(folder: Path) -> str | None:
    """Return the base model a pruned-UNet folder names, or None for another folder."""
    from snapc.pruned import is_pruned_folder, read_record

    if not is_pruned_folder(folder):
        return None
    try:
        return read_record(folder).base
    except SnapcError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _folder(model: str) -> Path:
    from snapc.shapes_latent.config import WEIGHTS_DIR

    folder = WEIGHTS_DIR if model == LATENT_NAME else Path(model)
    missing = [p for p in _PARTS if not (folder / p).is_file()]
    if model == LATENT_NAME and missing:
        raise WeightsError(f"shapes-latent is not trained yet ({folder} lacks {missing[0]}); "
                           f"train it on a GPU with `{_TRAIN}`, or evaluate a folder it wrote "
                           "(--out DIR): snapc evaluate DIR")
    if missing:
        raise WeightsError(f"{folder} lacks {missing[0]}, so it is not a whole shapes-latent "
                           f"pipeline; finish its training (`{_TRAIN} --out {folder}`)")
    return folder


def _load_unet(folder: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError

    try:
        return UNet2DConditionModel.from_pretrained(folder, low_cpu_mem_usage=False).float().eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"cannot load the latent UNet in {folder}: {_first_line(exc)}; "
                           "re-run the unet phase of bench/train_shapes_latent.py") from None


def _load_text(path: Path) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from snapc.shapes.text import TextEncoder

    text = TextEncoder()
    try:
        text.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"cannot load the text encoder {path}: {_first_line(exc)}; re-run "
                           "the unet phase of bench/train_shapes_latent.py") from None
    return text.eval()


def load_decoder(folder: str | Path) -> nn.Module:
    """Return the AutoencoderKL of a decoder folder (compressed-decoder folder, plain
    AutoencoderKL folder, or a folder with vae/), eval mode, fp32.

    Raises WeightsError (one line, naming the fix) for a missing or corrupt folder.
    """
    from snapc.decoder import load_vae

    path = Path(folder)
    if not path.is_dir():
        raise WeightsError(f"decoder folder {path} not found; pass a folder written by "
                           "`snapc compress-decoder -o DIR` (or an AutoencoderKL folder)")
    try:
        return load_vae(str(path)).vae.float().eval()
    except SnapcError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed record
        raise WeightsError(f"corrupt decoder folder {path} ({type(exc).__name__}: "
                           f"{_first_line(exc)}); re-run `snapc compress-decoder`") from None


def _check_fits(vae: nn.Module, decoder: nn.Module, where: str) -> None:
    """Raise SnapcError unless ``decoder`` decodes the pipeline autoencoder's latents."""
    ours, theirs = vae.config, decoder.config
    if int(theirs.latent_channels) != int(ours.latent_channels):
        raise SnapcError(f"decoder {where} decodes {theirs.latent_channels}-channel latents, "
                         f"the pipeline's UNet makes {ours.latent_channels}; pass a decoder "
                         "compressed from this pipeline's vae/")
    if not math.isclose(float(theirs.scaling_factor), float(ours.scaling_factor),
                        rel_tol=1e-6):
        raise SnapcError(f"decoder {where} has scaling_factor {theirs.scaling_factor:g}, the "
                         f"pipeline's autoencoder {ours.scaling_factor:g}: it belongs to another "
                         "autoencoder; pass a decoder compressed from this pipeline's vae/")


def load_latent_pipeline(model: str, *, decoder: str | Path | None = None,
                         device: str = "cpu") -> LatentPipeline:
    """Return MODEL (``shapes-latent`` or a folder of its layout) on ``device``, its decoder
    replaced by the one in ``decoder`` when given.

    Raises SnapcError (one line, naming the fix) for weights not trained yet, a missing or
    corrupt part, or a decoder that does not decode this pipeline's latents; the decoder
    folder and the device are checked before the pipeline's weights are read.
    """
    from snapc.decoder import load_vae
    from snapc.evaluation import check_device, sampler_of
    from snapc.pruned import RECORD_FILE, load_pruned_unet, read_record

    check_device(device)
    pruned = Path(model) if model != LATENT_NAME and _pruned_base(Path(model)) else None
    folder = _folder(LATENT_NAME if pruned else model)
    sampler = SamplerSpec() if pruned is None else sampler_of(read_record(pruned).sampler,
                                                               str(pruned / RECORD_FILE))
    substitute = None if decoder is None else load_decoder(decoder)
    vae = load_vae(str(folder / "vae")).vae.float().eval()
    if substitute is not None:
        _check_fits(vae, substitute, str(decoder))
        vae = substitute
    unet = _load_unet(folder / "unet") if pruned is None else load_pruned_unet(pruned).eval()
    text = _load_text(folder / "text_encoder.safetensors")
    parts = [m.to(device).requires_grad_(False) for m in (vae, unet, text)]
    return LatentPipeline(name=model, vae=parts[0], unet=parts[1], text=parts[2],
                          decoder="vae/" if decoder is None else str(decoder), device=device,
                          sampler=sampler)


def latent_images(pipeline: LatentPipeline, codes: torch.Tensor, *,
                  sampler: SamplerSpec | None = None, steps: int | None = None,
                  seed: int = 0, batch: int = 250,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (raw-scaled latents, 64x64 images in [-1, 1]) for the captions of ``codes``,
    sampled with ``sampler`` (None: the pipeline's own), ``steps`` overriding its steps.

    Image i depends only on (i, seed), so two pipelines that differ in their decoder get the
    same latents and differ only in the decoded pictures.
    """
    from dataclasses import replace

    from snapc.shapes.data import caption
    from snapc.shapes_latent.pipeline import generate

    spec = sampler or pipeline.sampler
    if steps is not None:
        spec = replace(spec, steps=steps)
    return generate(pipeline.vae, pipeline.unet, pipeline.text,
                    [caption(int(c)) for c in codes], steps=spec.steps, guidance=spec.guidance,
                    spacing=spec.spacing, guidance_embedded=spec.guidance_embedded,
                    alpha_floor=spec.alpha_floor, seed=seed, batch=batch,
                    device=pipeline.device, progress=progress)


def check_latent_request(*, prompts: int, steps: int | None = None,
                         spacing: str | None = None, batch: int | None = None,
                         alpha_floor: float | None = None) -> None:
    """Raise SnapcError for a request shapes-latent cannot take (those of
    :func:`snapc.evaluation.check_request`)."""
    from snapc.evaluation import check_request

    check_request(prompts=prompts, steps=steps, spacing=spacing, batch=batch,
                  alpha_floor=alpha_floor)


def evaluate_latent(
    model: str | LatentPipeline,
    *,
    decoder: str | Path | None = None,
    prompts: int = 200,
    steps: int | None = None,
    guidance: float | None = None,
    spacing: str | None = None,
    alpha_floor: float | None = None,
    device: str = "cpu",
    batch: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Return the prompt adherence and FD of the whole pipeline on ``validation_codes(prompts)``.

    ``model`` is what :func:`load_latent_pipeline` takes (with ``decoder`` and ``device``), or
    its result. Sampler: the model's stored one (a plain pipeline: 25 linspace DDIM steps with
    CFG 3, the recipe's check), steps / guidance / spacing / alpha_floor overriding. The
    result has the keys model, base, decoder, decoder_params, prompts, the sampler's fields
    (steps, guidance, spacing, guidance_embedded, alpha_floor), unet_calls_per_image,
    adherence, exact, count, colour, shape, size, position, fd, seconds and device. Raises
    SnapcError for a bad request (checked before loading) or a pipeline that cannot be loaded.
    """
    from snapc.decoder.measure import decoder_params
    from snapc.evaluation import resolve_sampler
    from snapc.quality import (
        frechet_distance,
        image_features,
        load_feature_classifier,
        prompt_adherence,
        validation_codes,
    )
    from snapc.shapes.data import render
    from snapc.shapes_latent.config import to_shapes_resolution

    check_latent_request(prompts=prompts, steps=steps, spacing=spacing, batch=batch,
                         alpha_floor=alpha_floor)
    pipeline = model if isinstance(model, LatentPipeline) else load_latent_pipeline(
        model, decoder=decoder, device=device)
    spec = resolve_sampler(pipeline.sampler, steps=steps, guidance=guidance, spacing=spacing,
                           alpha_floor=alpha_floor)
    classifier = load_feature_classifier().to(pipeline.device)
    codes = validation_codes(prompts)
    start = time.perf_counter()
    _, images = latent_images(pipeline, codes, sampler=spec, seed=seed, batch=batch or 250,
                              progress=progress)
    small = to_shapes_resolution(images)
    scores = prompt_adherence(small, codes)
    scores["fd"] = frechet_distance(image_features(classifier, small),
                                    image_features(classifier, render(codes)))
    return {"model": pipeline.name, "base": LATENT_NAME, "decoder": pipeline.decoder,
            "decoder_params": decoder_params(pipeline.vae), "prompts": prompts,
            **spec.to_json(), "unet_calls_per_image": spec.unet_calls_per_image, **scores,
            "seconds": time.perf_counter() - start, "device": pipeline.device}
