"""What a distillation batch is made of: noised samples, their noise, timesteps, conditioning.

Two sources, one interface (:class:`NoisedBatches`):

- :class:`ShapesScenes`: the ``shapes`` family's procedural scenes rendered on the fly on the
  training device, captions through the shipped text encoder, caption dropout to the empty
  caption (what classifier-free guidance needs).
- :class:`TeacherSamples`: data-free distillation for any other model: the teacher itself
  draws a pool of samples (DDIM with CFG where an unconditional embedding is given) from the
  conditioning the user has (an embeddings ``.safetensors``: ``encoder_hidden_states``
  (N, L, D), optional ``uncond`` (1, L, D)); each batch re-noises pool samples. A random-weight
  model runs on random conditioning, as a smoke test.

Every batch is drawn whole from a generator seeded by (seed, step), then sliced to the rank's
rows, so resuming and data parallelism do not change what is seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from snapc.errors import SnapcError
from snapc.train.distributed import World
from snapc.train.loop import Batch, batch_generator

__all__ = ["NoisedBatches", "ShapesScenes", "TeacherSamples", "NoiseSchedule",
           "load_conditioning", "ConditioningError"]


class ConditioningError(SnapcError):
    """The conditioning file is missing, corrupt or of the wrong width."""


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process: alpha_bar_t for t = 0 .. T-1 (epsilon prediction)."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def for_model(cls, base: str, device: torch.device) -> NoiseSchedule:
        """Return the schedule a model was trained with: shapes' cosine schedule (shapes and
        shapes-latent families), else SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps)
        through diffusers' scheduler."""
        from snapc.families import is_trained_family

        if is_trained_family(base):
            from snapc.shapes.schedule import alphas_cumprod

            return cls(alphas_cumprod(device))
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
        return cls(sched.alphas_cumprod.float().to(device))

    @property
    def steps(self) -> int:
        """Return the number of training timesteps T."""
        return int(self.alphas_cumprod.shape[0])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise for (B,) integer timesteps t."""
        ab = self.alphas_cumprod[t.long()].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


class NoisedBatches:
    """Base of batch sources: ``batch(step, world)`` returns this rank's rows of a global
    batch {x_t, t, noise, context}."""

    batch_size: int
    seed: int
    device: torch.device
    schedule: NoiseSchedule

    def clean(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n clean samples and their conditioning (context), dropout applied."""
        raise NotImplementedError

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's slice of global batch ``step``."""
        gen = batch_generator(self.seed, step, self.device)
        n = self.batch_size
        x0, context = self.clean(gen, n)
        t = torch.randint(0, self.schedule.steps, (n,), generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        rows = world.local_slice(n)
        xt = self.schedule.add_noise(x0, noise, t)
        return {"x_t": xt[rows], "t": t[rows].float(), "noise": noise[rows],
                "context": context[rows], "step": step}

    def describe(self) -> dict:
        """Return the source's settings for the training record."""
        return {"source": type(self).__name__, "batch": self.batch_size}


class ShapesScenes(NoisedBatches):
    """Procedural scenes of the shapes data set, rendered on the training device."""

    def __init__(self, batch_size: int, seed: int, device: torch.device,
                 caption_dropout: float = 0.1) -> None:
        from snapc.shapes.model import load_text_encoder

        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.caption_dropout = caption_dropout
        self.text = load_text_encoder().to(device)
        self.schedule = NoiseSchedule.for_model("shapes", device)

    def scene_codes(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n training scene codes and their caption tokens, a ``caption_dropout``
        fraction of them the empty caption (what CFG needs)."""
        from snapc.shapes.data import sample_codes
        from snapc.shapes.text import caption_tokens

        codes = sample_codes(n, split="train", generator=gen, device=self.device)
        tokens = caption_tokens(codes)
        drop = torch.rand(n, generator=gen, device=self.device) < self.caption_dropout
        return codes, torch.where(drop.unsqueeze(1), torch.zeros_like(tokens), tokens)

    @torch.no_grad()
    def clean(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n rendered training scenes and their caption states (dropout to "")."""
        from snapc.shapes.data import render

        codes, tokens = self.scene_codes(gen, n)
        return render(codes), self.text(tokens).float()

    def describe(self) -> dict:
        """Return the source's settings for the training record."""
        return {**super().describe(), "caption_dropout": self.caption_dropout}


def load_conditioning(
    path: Path | None, dim: int, length: int, *, random_ok: bool, seed: int = 0,
    n_random: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (N, L, D) conditioning states and an optional (1, L, D) unconditional state.

    ``path`` is a ``.safetensors`` with ``encoder_hidden_states`` (and optionally
    ``uncond``); without a path, ``random_ok`` models get ``n_random`` Gaussian states.
    ConditioningError names the fix for a missing, corrupt or wrong-width file.
    """
    if path is None:
        if not random_ok:
            raise ConditioningError(
                "data-free distillation needs the conditioning the model is used with: pass "
                "--conditioning FILE.safetensors with encoder_hidden_states (N, L, "
                f"{dim}) and optionally uncond (1, L, {dim})")
        gen = torch.Generator().manual_seed(seed + 17)
        return torch.randn(n_random, length, dim, generator=gen), None
    if not path.is_file():
        raise ConditioningError(f"conditioning file not found: {path}")
    from snapc.model_io import read_state_dict

    try:
        state = read_state_dict(path)
    except SnapcError as exc:
        raise ConditioningError(str(exc)) from exc
    if "encoder_hidden_states" not in state:
        raise ConditioningError(f"{path} has no 'encoder_hidden_states' tensor (found "
                                f"{', '.join(sorted(state)) or 'nothing'})")
    states = state["encoder_hidden_states"].float()
    uncond = state.get("uncond")
    for name, t in (("encoder_hidden_states", states), ("uncond", uncond)):
        if t is not None and (t.dim() != 3 or t.shape[-1] != dim):
            raise ConditioningError(f"{path}: {name} has shape {list(t.shape)}; the model "
                                    f"expects (N, L, {dim}) conditioning of width {dim}")
    return states, None if uncond is None else uncond.float()[:1]


class TeacherSamples(NoisedBatches):
    """Data-free batches: a pool of teacher samples drawn once, re-noised every batch."""

    def __init__(self, teacher: torch.nn.Module, states: torch.Tensor,
                 uncond: torch.Tensor | None, *, sample_shape: tuple[int, ...], base: str,
                 batch_size: int, seed: int, device: torch.device, pool: int = 256,
                 sampling_steps: int = 20, guidance: float = 7.5,
                 caption_dropout: float = 0.1) -> None:
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.caption_dropout = caption_dropout if uncond is not None else 0.0
        self.schedule = NoiseSchedule.for_model(base, device)
        self.states = states.to(device)
        self.uncond = None if uncond is None else uncond.to(device)
        self.pool_size, self.sampling_steps, self.guidance = pool, sampling_steps, guidance
        self.pool_x0, self.pool_context = self._draw_pool(teacher, sample_shape)

    @torch.no_grad()
    def _draw_pool(self, teacher: torch.nn.Module,
                   shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import DDIMScheduler

        gen = batch_generator(self.seed, 0, self.device, stream=1)
        pick = torch.randint(0, len(self.states), (self.pool_size,), generator=gen,
                             device=self.device)
        context = self.states[pick]
        sched = DDIMScheduler(num_train_timesteps=self.schedule.steps, clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing")
        sched.alphas_cumprod = self.schedule.alphas_cumprod.cpu()
        sched.set_timesteps(self.sampling_steps)
        out = []
        for lo in range(0, self.pool_size, 32):
            ctx = context[lo : lo + 32]
            x = torch.randn(len(ctx), *shape, generator=gen, device=self.device)
            for t in sched.timesteps:
                tt = torch.full((len(x),), float(t), device=self.device)
                if self.uncond is None:
                    eps = teacher(x, tt, ctx, return_dict=False)[0]
                else:
                    both = teacher(torch.cat([x, x]), torch.cat([tt, tt]),
                                   torch.cat([self.uncond.expand_as(ctx), ctx]),
                                   return_dict=False)[0]
                    eps_u, eps_c = both.chunk(2)
                    eps = eps_u + self.guidance * (eps_c - eps_u)
                x = sched.step(eps, t, x).prev_sample
            out.append(x)
        return torch.cat(out), context

    def clean(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n pool samples and their conditioning (dropout to the unconditional)."""
        pick = torch.randint(0, self.pool_size, (n,), generator=gen, device=self.device)
        x0, context = self.pool_x0[pick], self.pool_context[pick]
        if self.uncond is not None and self.caption_dropout > 0:
            drop = torch.rand(n, generator=gen, device=self.device) < self.caption_dropout
            context = torch.where(drop.view(-1, 1, 1), self.uncond.expand_as(context), context)
        return x0, context

    def describe(self) -> dict:
        """Return the source's settings for the training record."""
        return {**super().describe(), "pool": self.pool_size,
                "sampling_steps": self.sampling_steps, "guidance": self.guidance,
                "conditioning": len(self.states), "uncond": self.uncond is not None,
                "caption_dropout": self.caption_dropout}
