"""What snapc's generic tools need of the shapes-latent family, so that block search, recovery
and step distillation work on it as on ``shapes``.

The family is the shipped latent UNet (the registered model ``shapes-latent``) and every model
derived from it (a pruned / recovered folder whose record's base is ``shapes-latent``). Its
autoencoder and text encoder are always the shipped ones: derived models change the UNet only.

- :func:`load_unet_model`: the registered UNet with example inputs of real caption states on
  16x16x4 latents (inspect, cost, compile, search).
- :class:`LatentScenes`: training batches for distillation: shapes scenes at 64x64 through the
  frozen encoder (posterior mean x scaling_factor, as the UNet was trained), captions through
  the shipped text encoder with caption dropout.
- :func:`calibration_triples`: noised encoded scenes for the search proxy and quantization.
- :class:`LatentAdherenceLoss` and :func:`latent_adherence_score`: the full metric (sampled
  latents decoded by the shipped decoder, prompt adherence of the pictures) for the block
  search and the recovery screening.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from snapc.families import LATENT_BASE
from snapc.graph import Graph
from snapc.shapes_latent.config import LATENT_CHANNELS, LATENT_SIZE, WEIGHTS_DIR
from snapc.train.data import NoiseSchedule, ShapesScenes

__all__ = ["load_parts", "shipped_text_encoder", "example_inputs", "load_unet_model",
           "LatentScenes", "calibration_triples", "x0_bound", "LatentAdherenceLoss",
           "latent_adherence_score"]


def load_parts(weights_dir: Path = WEIGHTS_DIR) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Return fresh (vae, unet, text_encoder) of the shipped pipeline (eval, fp32)."""
    from snapc.shapes_latent.pipeline import load_pipeline

    return load_pipeline(weights_dir)


@lru_cache(maxsize=1)
def _frozen_vae_and_text() -> tuple[nn.Module, nn.Module]:
    # read once per process: data, calibration and metrics only read them (no gradients)
    from snapc.shapes_latent.pipeline import load_autoencoder_and_text

    vae, text = load_autoencoder_and_text()
    return vae.requires_grad_(False), text.requires_grad_(False)


def shipped_text_encoder() -> nn.Module:
    """Return the shipped text encoder (read once per process, frozen)."""
    return _frozen_vae_and_text()[1]


def _caption_states(captions: list[str], text: nn.Module) -> torch.Tensor:
    from snapc.shapes.text import tokenize

    device = next(text.parameters()).device
    with torch.no_grad():
        return text(tokenize(captions).to(device)).float()


def example_inputs(batch: int, text: nn.Module) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Return seeded (sample, timestep, encoder_hidden_states): (B, 4, 16, 16) noise, (B,)
    timesteps and the caption states of B seeded training captions."""
    from snapc.shapes.data import caption, sample_codes

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
    timestep = torch.linspace(900.0, 100.0, batch) if batch > 1 else torch.tensor([500.0])
    codes = sample_codes(batch, split="train", generator=gen)
    return sample, timestep, _caption_states([caption(int(c)) for c in codes], text)


def load_unet_model(batch: int, latent: int | None, device: torch.device, seed: int):
    """Return the registered ``shapes-latent`` UNet as a :class:`snapc.models.LoadedModel`."""
    from snapc.errors import WeightsError
    from snapc.graph import ModelInfo
    from snapc.model_io import LoadedModel, file_sha256

    if latent is not None and latent != LATENT_SIZE:
        raise WeightsError(f"model 'shapes-latent' samples {LATENT_SIZE}x{LATENT_SIZE} latents; "
                           f"drop --latent {latent}")
    _, unet, text = load_parts()
    weights = WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    info = ModelInfo(name=LATENT_BASE, random_weights=False, config=dict(unet.config),
                     weights_path=str(weights), weights_sha256=file_sha256(weights))
    inputs = tuple(t.to(device) for t in example_inputs(batch, text))
    return LoadedModel(unet.to(device), inputs, info)


class LatentScenes(ShapesScenes):
    """shapes scenes at 64x64 through the frozen encoder, rendered on the training device."""

    def __init__(self, batch_size: int, seed: int, device: torch.device,  # noqa: D107
                 caption_dropout: float = 0.1) -> None:
        vae, text = _frozen_vae_and_text()
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.caption_dropout = caption_dropout
        self.vae, self.text = vae.to(device), text.to(device)
        self.schedule = NoiseSchedule.for_model(LATENT_BASE, device)

    @torch.no_grad()
    def clean(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n scaled latents of training scenes and their caption states (dropout to "")."""
        from snapc.shapes_latent.config import scenes
        from snapc.shapes_latent.methods import encode_latents

        codes, tokens = self.scene_codes(gen, n)
        return encode_latents(self.vae, scenes(codes)).float(), self.text(tokens).float()

    def describe(self) -> dict:
        """Return the source's settings for the training record."""
        return {**super().describe(),
                "data": "shapes scenes 64x64 through shapes-latent's frozen encoder"}


def calibration_triples(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Return n seeded (latent, timestep, caption states) batched along dim 0: encoded
    training scenes noised to uniformly drawn timesteps (what the UNet sees while sampling)."""
    from snapc.shapes.data import caption, sample_codes
    from snapc.shapes.schedule import TRAIN_STEPS, add_noise
    from snapc.shapes_latent.config import scenes
    from snapc.shapes_latent.methods import encode_latents

    vae, text = _frozen_vae_and_text()
    vae, text = vae.cpu(), text.cpu()
    gen = torch.Generator().manual_seed(seed)
    codes = sample_codes(n, split="train", generator=gen)
    t = torch.randint(0, TRAIN_STEPS, (n,), generator=gen)
    z = encode_latents(vae, scenes(codes)).float()
    x = add_noise(z, torch.randn(z.shape, generator=gen), t)
    return x, t.float(), _caption_states([caption(int(c)) for c in codes], text)


def x0_bound() -> float:
    """Return the bound an x0 estimate is clipped to: the encoder's latent range."""
    from snapc.shapes_latent.pipeline import latent_range

    return latent_range(_frozen_vae_and_text()[0])  # on its device: it is shared


def _adherence_of_images(images: torch.Tensor, codes: torch.Tensor) -> float:
    from snapc.quality import prompt_adherence
    from snapc.shapes_latent.config import to_shapes_resolution

    return prompt_adherence(to_shapes_resolution(images).cpu(), codes)["adherence"]


def _adherence_of_latents(latents: torch.Tensor, codes: torch.Tensor) -> float:
    vae = _frozen_vae_and_text()[0].to(latents.device)
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return _adherence_of_images(images, codes)


class LatentAdherenceLoss:
    """``metric(removed) -> 1 - prompt adherence`` of shapes-latent pictures sampled with
    ``removed`` bypassed in ``graph`` (decoded by the shipped decoder); the latent analogue of
    :class:`snapc.search_metrics.AdherenceLoss`, with the same arguments."""

    def __init__(self, graph: Graph, prompts: int = 100, steps: int = 10,
                 guidance: float = 3.0, device: str = "cpu", seed: int = 123) -> None:
        from snapc.incremental import BypassEvaluator
        from snapc.quality import validation_codes
        from snapc.shapes.data import caption

        vae, text = _frozen_vae_and_text()
        self.codes = validation_codes(prompts, seed=seed)
        text = text.to(device)
        self.context = _caption_states([caption(int(c)) for c in self.codes], text)
        self.uncond = _caption_states([""], text)
        self.noise = torch.randn(prompts, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE,
                                 generator=torch.Generator().manual_seed(seed)).to(device)
        self.bound = x0_bound()
        self.steps, self.guidance = steps, guidance
        batch = 2 * prompts  # conditional and unconditional halves in one batch
        example = (torch.zeros(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, device=device),
                   torch.zeros(batch, device=device),
                   torch.zeros(batch, *self.context.shape[1:], device=device))
        self.evaluator = BypassEvaluator(graph.at_batch(example), example, device=device)
        self.__name__ = f"latent_adherence_loss_{prompts}p_{steps}s"

    def __call__(self, removed: Iterable[str]) -> float:
        """Return 1 - prompt adherence of pictures sampled with ``removed`` bypassed."""
        from snapc.shapes_latent.pipeline import sample_latents

        removed = frozenset(removed)

        def unet(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
            return (self.evaluator.full(removed, (x, t, ctx)),)

        latents = sample_latents(unet, self.context, self.uncond, steps=self.steps,
                                 guidance=self.guidance, noise=self.noise, x0_range=self.bound)
        return 1.0 - _adherence_of_latents(latents, self.codes)


def latent_adherence_score(prompts: int = 100, steps: int = 10, guidance: float = 3.0,
                           seed: int = 321):
    """Return ``score(unet, device) -> 1 - prompt adherence`` for shapes-latent-family UNets
    (the latent analogue of :func:`snapc.train.screening.adherence_score`)."""
    from snapc.quality import validation_codes
    from snapc.shapes.data import caption
    from snapc.shapes_latent.pipeline import generate

    codes = validation_codes(prompts, seed=seed)

    def score(unet: nn.Module, device: torch.device) -> float:
        vae, text = _frozen_vae_and_text()
        _, images = generate(vae.to(device), unet.eval(), text.to(device),
                             [caption(int(c)) for c in codes], steps=steps, guidance=guidance,
                             seed=seed, batch=prompts, device=device)
        return 1.0 - _adherence_of_images(images, codes)

    return score
