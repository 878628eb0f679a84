"""Quality metrics for the shapes reference model: exact prompt adherence, Fréchet distance, and
a quick UNet-level fidelity proxy for search.

* Prompt adherence (the CLIP-score analogue): decode colour, shape, size and position of every
  object from the pixels (:func:`snapc.shapes.data.decode`) and score the fraction of attributes
  that match the prompt, under the best pairing of objects; extra or missing objects count as
  misses. Ground-truth images score 1.0.
* Fréchet distance (the FID analogue): between Gaussians fitted to penultimate features of a
  small classifier trained on the data set (:class:`FeatureClassifier`)::

      FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

* Proxy: PSNR / normalised MSE of a candidate's noise prediction against the original's over
  calibration (noisy image, timestep, caption) triples; cheap enough to run inside a search.

Both full metrics use a fixed protocol: EVAL_PROMPTS validation prompts from EVAL_SEED, DDIM with
EVAL_STEPS steps and guidance EVAL_GUIDANCE, start noise seeded per prompt index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
from torch import nn

from snapc.shapes.data import (
    N_OBJECTS,
    SceneObject,
    caption,
    decode,
    match_score,
    objects_of,
    render,
    sample_codes,
)
from snapc.shapes.model import WEIGHTS_DIR, encode_captions, load_text_encoder
from snapc.shapes.sampler import Denoiser, sample
from snapc.shapes.schedule import TRAIN_STEPS, add_noise
from snapc.shapes.text import TextEncoder

__all__ = [
    "EVAL_PROMPTS",
    "EVAL_SEED",
    "EVAL_STEPS",
    "EVAL_GUIDANCE",
    "FeatureClassifier",
    "cell_targets",
    "load_feature_classifier",
    "validation_codes",
    "generate",
    "prompt_adherence",
    "frechet_distance",
    "image_features",
    "evaluate",
    "calibration_triples",
    "proxy_fidelity",
    "spearman",
]

EVAL_PROMPTS = 1000
EVAL_SEED = 0
EVAL_STEPS = 25
EVAL_GUIDANCE = 3.0
_ATTRIBUTES = ("colour", "shape", "size", "position")
_CELL_CLASSES = 1 + N_OBJECTS // 9  # empty, or one of 56 (colour, shape, size)


class FeatureClassifier(nn.Module):
    """A small CNN that names what occupies each of the 9 grid cells.

    ``forward(images)`` returns (B, 9, 57) logits (class 0: empty; else 1 + object id // 9);
    ``features(images)`` returns the (B, 128) penultimate activations used for the Fréchet
    distance.
    """

    def __init__(self, width: int = 32, dim: int = 128) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *conv(3, width, 1), *conv(width, 2 * width, 2), *conv(2 * width, 2 * width, 1),
            *conv(2 * width, 2 * width, 2), nn.Flatten(), nn.Linear(2 * width * 64, dim), nn.SiLU(),
        )
        self.head = nn.Linear(dim, 9 * _CELL_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, dim) features of (B, 3, 32, 32) images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, 9, 57) per-cell class logits."""
        return self.head(self.body(images)).view(-1, 9, _CELL_CLASSES)


def cell_targets(codes: torch.Tensor) -> torch.Tensor:
    """Return (B, 9) int64 per-cell classes of scene codes: 0 empty, else 1 + object id // 9."""
    codes = codes.long()
    two = codes >= N_OBJECTS
    rest = (codes - N_OBJECTS).clamp(min=0)
    objs = torch.stack([torch.where(two, rest // N_OBJECTS, codes), rest % N_OBJECTS], 1)
    present = torch.stack([torch.ones_like(two), two], 1)
    target = torch.zeros(codes.shape[0], 9 + 1, dtype=torch.long, device=codes.device)
    cell = torch.where(present, objs % 9, torch.full_like(objs, 9))  # absent -> spill column
    target.scatter_(1, cell, torch.where(present, 1 + objs // 9, torch.zeros_like(objs)))
    return target[:, :9]


def load_feature_classifier(weights_dir: Path = WEIGHTS_DIR) -> FeatureClassifier:
    """Return the shipped feature classifier in eval mode, fp32."""
    from safetensors.torch import load_file

    path = weights_dir / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"shipped shapes weights missing: {path}")
    model = FeatureClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval().requires_grad_(False)


def validation_codes(n: int = EVAL_PROMPTS, seed: int = EVAL_SEED) -> torch.Tensor:
    """Return the fixed (n,) validation scene codes of the evaluation protocol."""
    return sample_codes(n, split="val", generator=torch.Generator().manual_seed(seed))


def _start_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def generate(
    unet: Denoiser,
    text_encoder: TextEncoder,
    codes: torch.Tensor,
    *,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    seed: int = EVAL_SEED,
    batch: int = 250,
    device: torch.device | str = "cpu",
    batch_cfg: bool = True,
    spacing: str = "linspace",
    guidance_embedded: bool = False,
    alpha_floor: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Return (N, 3, 32, 32) images in [-1, 1] (on CPU) generated for the captions of codes.

    Start noise is drawn once for all N from `seed`, so image i depends only on (i, seed).
    batch_cfg=False calls the denoiser at batch size `batch` (for graphs traced at fixed batch).
    spacing, guidance_embedded and alpha_floor are passed to :func:`snapc.shapes.sampler.sample`.
    progress(done, total) is called after each chunk of images.
    """
    noise = _start_noise(len(codes), seed)
    uncond = encode_captions([""], text_encoder).to(device)
    out = []
    for lo in range(0, len(codes), batch):
        chunk = codes[lo : lo + batch]
        context = encode_captions([caption(int(c)) for c in chunk], text_encoder).to(device)
        x = sample(unet, context, uncond, steps=steps, guidance=guidance,
                   noise=noise[lo : lo + len(chunk)].to(device), batch_cfg=batch_cfg,
                   spacing=spacing, guidance_embedded=guidance_embedded,
                   alpha_floor=alpha_floor)
        out.append(x.cpu())
        if progress is not None:
            progress(lo + len(chunk), len(codes))
    return torch.cat(out)


def _aligned(expected: list[SceneObject], found: list[SceneObject]) -> list[SceneObject]:
    """Return found reordered to pair best with expected (same length)."""
    return max((list(p) for p in permutations(found)), key=lambda p: match_score(expected, p)[0])


def prompt_adherence(images: torch.Tensor, codes: torch.Tensor) -> dict[str, float]:
    """Return the attribute-match fraction of images against their scene codes.

    Keys: ``adherence`` (matched / counted attributes over all images, extra and missing
    objects counted as misses), ``exact`` (fraction of images decoded exactly as the prompt),
    ``count`` (fraction with the right number of objects) and, per attribute, the accuracy over
    objects whose image has the right object count.
    """
    hits = total = exact = count_ok = 0
    per_attr = dict.fromkeys(_ATTRIBUTES, 0)
    n_objects = 0
    for found, code in zip(decode(images), codes.tolist(), strict=True):
        expected = objects_of(int(code))
        h, t = match_score(expected, found)
        hits, total = hits + h, total + t
        exact += int(h == t)
        if len(found) == len(expected):
            count_ok += 1
            n_objects += len(expected)
            for x, y in zip(expected, _aligned(expected, found), strict=True):
                for name, a, b in zip(_ATTRIBUTES, x.attributes(), y.attributes(), strict=True):
                    per_attr[name] += int(a == b)
    n = len(codes)
    result = {"adherence": hits / total, "exact": exact / n, "count": count_ok / n}
    result |= {k: v / max(n_objects, 1) for k, v in per_attr.items()}
    return result


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the Fréchet distance between Gaussians fitted to (N, D) feature sets a and b."""
    a64, b64 = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum()
    return float(max(fd, 0.0))


@torch.no_grad()
def image_features(classifier: FeatureClassifier, images: torch.Tensor,
                   batch: int = 500) -> torch.Tensor:
    """Return (N, D) classifier features of images (computed on the classifier's device)."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(images[i : i + batch].to(device)).cpu()
                      for i in range(0, len(images), batch)])


def evaluate(
    unet: Denoiser,
    text_encoder: TextEncoder,
    classifier: FeatureClassifier,
    *,
    codes: torch.Tensor | None = None,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    device: torch.device | str = "cpu",
    spacing: str = "linspace",
    guidance_embedded: bool = False,
    alpha_floor: float = 0.0,
    batch: int = 250,
    batch_cfg: bool = True,
    seed: int = EVAL_SEED,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Return prompt adherence (see :func:`prompt_adherence`) and ``fd`` of generated images.

    The Fréchet distance compares generated images with the ground-truth renders of the same
    validation prompts. The keyword arguments after ``device`` are :func:`generate`'s.
    """
    codes = validation_codes() if codes is None else codes
    images = generate(unet, text_encoder, codes, steps=steps, guidance=guidance, device=device,
                      spacing=spacing, guidance_embedded=guidance_embedded,
                      alpha_floor=alpha_floor, batch=batch, batch_cfg=batch_cfg, seed=seed,
                      progress=progress)
    real = render(codes)
    result = prompt_adherence(images, codes)
    result["fd"] = frechet_distance(image_features(classifier, images),
                                    image_features(classifier, real))
    return result


@torch.no_grad()
def calibration_triples(
    n: int, seed: int = 0, text_encoder: TextEncoder | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Return n seeded (sample, timestep, encoder_hidden_states) triples, each of batch 1.

    samples are training-split images noised to uniformly drawn timesteps (the inputs a UNet
    sees while sampling); contexts come from their captions through the text encoder (the
    shipped one unless given). Deterministic given (n, seed).
    """
    gen = torch.Generator().manual_seed(seed)
    text_encoder = load_text_encoder() if text_encoder is None else text_encoder
    codes = sample_codes(n, split="train", generator=gen)
    t = torch.randint(0, TRAIN_STEPS, (n,), generator=gen)
    x = add_noise(render(codes), torch.randn(n, 3, 32, 32, generator=gen), t)
    context = encode_captions([caption(int(c)) for c in codes], text_encoder).cpu()
    return [(x[i : i + 1], t[i : i + 1].float(), context[i : i + 1]) for i in range(n)]


def _as_tensor(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


@torch.no_grad()
def proxy_fidelity(
    reference_fn: Denoiser,
    candidate_fn: Denoiser,
    triples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """Return ``psnr_db`` and ``nmse`` of the candidate's noise prediction vs the reference's.

    nmse = sum |c - r|^2 / sum |r|^2 over all triples; psnr_db = 10 log10(max|r|^2 / mse)
    (inf when the outputs are identical). Both functions take (sample, timestep, context).
    """
    err = power = 0.0
    count = 0
    peak = 0.0
    for triple in triples:
        ref = _as_tensor(reference_fn(*triple)).double()
        cand = _as_tensor(candidate_fn(*triple)).double()
        err += float(((cand - ref) ** 2).sum())
        power += float((ref**2).sum())
        count += ref.numel()
        peak = max(peak, float(ref.abs().max()))
    mse = err / count
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    return {"psnr_db": psnr, "nmse": err / power}


def _ranks(x: Sequence[float]) -> np.ndarray:
    values = np.asarray(x, dtype=np.float64)
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for v in np.unique(values):  # ties share their mean rank
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Return Spearman's rank correlation of two equal-length sequences (ties averaged)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])
