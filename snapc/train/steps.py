"""Step distillation: guided + progressive distillation as a method of the training loop.

The goal is a student that samples in N DDIM steps with classifier-free guidance built in:
one conditional UNet call per step instead of two (CFG) at 25 or more steps. Two published
ideas, combined as Meng et al. (CVPR 2023) do:

- **Guided distillation** (Meng et al.): the student is called on the caption alone and learns
  to reproduce the CFG-combined teacher ``eps_u + w (eps_c - eps_u)``. Here w is fixed and
  baked into the weights (the student takes no extra input), so the stored sampler is
  ``SamplerSpec(steps=N, guidance=w, spacing="trailing", guidance_embedded=True)``.
- **Progressive distillation** (Salimans & Ho, ICLR 2022): each *round* halves the steps.
  The student's one DDIM step t -> t'' matches two teacher DDIM steps t -> t' -> t''; the
  student of a round is the teacher of the next: 32 -> 16 -> 8 -> 4 [-> 2 -> 1]. Round 1's
  teacher is the original model under CFG (two UNet calls per step); later teachers are the
  previous round's guidance-embedded student (one call). Every round starts the student
  from its teacher's weights.

Notation (the shapes cosine schedule, epsilon prediction): ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)``, ``z_t = alpha_t x + sigma_t eps``, ``SNR_t = alpha_t^2 /
sigma_t^2``. The end of sampling is written t = -1 with ``alpha = 1, sigma = 0``. One DDIM
step (eta 0) from t to s, exactly as :func:`snapc.shapes.sampler.sample` takes it::

    x0   = clip((z_t - sigma_t eps_hat) / alpha_t, -1, 1)      # the sampler's x0 clipping
    z_s  = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t    # = x0 when s is the end

Grid. A student of n steps samples on the trailing grid ``tau = ddim_timesteps(n,
"trailing")`` (999, 749, 499, 249 for n = 4) followed by the end; its teacher steps on the
2n-step trailing grid, which interleaves it: interval i of the student is ``t = tau_i``,
``t'' = tau_{i+1}`` (the end after the last), and the teacher's midpoint ``t'`` is element
2i + 1 of ``ddim_timesteps(2n, "trailing")`` (124 between 249 and the end).

Target. A batch draws training scenes x, a student interval i per row (uniform over the n
intervals) and noise, and forms ``z_t = alpha_t x + sigma_t eps`` at ``t = tau_i``. The
teacher takes its two clipped DDIM steps to ``z_t''``. Because a student DDIM step is
affine in its x0, ``z_t'' = (sigma_t''/sigma_t) z_t + (alpha_t'' - sigma_t''/sigma_t
alpha_t) x0``, so the one x0 whose single step lands on the teacher's ``z_t''`` is (Salimans
& Ho, Algorithm 2)::

    x0_target = (z_t'' - sigma_t''/sigma_t z_t) / (alpha_t'' - sigma_t''/sigma_t alpha_t)

It is a convex combination of the teacher's two clipped x0 estimates (both weights are >= 0
because SNR falls with t), so it lies in [-1, 1] like every x0 the sampler uses.

Loss. In x0 space, with Salimans & Ho's truncated-SNR weighting::

    L = mean over rows of  max(SNR_t, 1) * mean over pixels of (x0_student - x0_target)^2
    x0_student = clip((z_t - sigma_t eps_student) / alpha_t, -1, 1)

``max(SNR, 1)`` is x0 MSE at high noise and epsilon MSE at low noise (``SNR |x0 err|^2 =
|eps err|^2``), so no interval dominates. The student's x0 goes through the sampler's clip,
so the loss measures exactly the step the sampler will take, and pixels where the student
and the target saturate on the same side cost nothing.

One caveat of epsilon prediction: the cosine schedule's SNR at t = 999 (the first trailing
step) is 2.4e-9 (``alpha`` = 4.9e-5), so there ``x0 = (z - sigma eps)/alpha`` is decided by
digits of eps far below any network's accuracy: the shipped model's x0 clips in 99.7% of its
pixels and correlates 0.1 with the scene. Through the clip the loss then has no gradient in
almost every pixel, and in the few unclipped ones a gradient 2e4 times that of any other
interval (``d x0 / d eps = -sigma/alpha``). What the network does control at such a step
is the *sign* of the residual ``r = z - sigma eps``, and with the sampler's clip the sign is
all that reaches the image (x0 = clip(r / alpha) = sign(r) once |r| > alpha). So the
student's x0 in the loss divides by ``max(alpha, alpha_floor)`` (0.05 by default; it changes
only t = 999, and t = 968 of the 32-step grid by 4%)::

    x0_student = clip((z_t - sigma_t eps_student) / max(alpha_t, alpha_floor), -1, 1)

At t = 999 this trains ``r ~ alpha_floor x0_target`` with an ordinary, well-conditioned
regression, and the sampler then takes ``sign(x0_target)``, the best x0 in [-1, 1] whose
pixels are +-1 (the shapes palette is the corners of the RGB cube, so it is often exact).
Teachers are run with their own sampler's step (the original model: no floor). Measured on
the 2-core CPU (a 2 -> 1 round from ``shapes``, 4 training steps at batch 4, 50 prompts): the
1-step student reaches adherence 0.39 with the floor and 0.00 (FD 14080) without it.

Latent pipelines (``shapes-latent``) take the same method with two changes. The clip bound
is the range of the VAE's latents (``x0_bound``, from
:func:`snapc.shapes_latent.family.x0_bound`) instead of 1. And the sign argument above does
not carry over: latents are not corners of a cube, so ``sign(r)`` times the bound is a poor
latent. A latent student is therefore *sampled* with the floor its loss used
(``SamplerSpec.alpha_floor``, stored with its sampler): its step at t = 999 returns
``r / alpha_floor``, the regression's estimate of x0_target; and when it teaches the next
round it is run the same way (``teacher_floor``). The original model teaches round 1 with
no floor, as in pixel space.

Batches are drawn whole from generators seeded by (seed, step) and sliced to the rank's
rows, so resume and data parallelism see the same data as one uninterrupted process; the
teacher's targets are computed inside ``loss`` under no_grad, per rank.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from snapc.shapes.sampler import ddim_timesteps
from snapc.train.data import NoisedBatches
from snapc.train.distributed import World
from snapc.train.loop import Batch, batch_generator

__all__ = ["END", "StepLoss", "Round", "plan_rounds", "round_times", "ddim_step",
           "distillation_target", "StepDistillation"]

END = -1  # the end of sampling: alpha = 1, sigma = 0


@dataclass(frozen=True)
class StepLoss:
    """The step-distillation loss: weighting, the x0 floor at vanishing SNR, and the
    fraction of empty captions (the student is used conditional only, so 0 by default)."""

    weighting: str = "truncated-snr"  # max(SNR, 1); "x0": plain x0 MSE
    alpha_floor: float = 0.05
    caption_dropout: float = 0.0

    def check(self) -> None:
        """Raise SnapcError naming the field that is out of range."""
        from snapc.errors import SnapcError

        if self.weighting not in ("truncated-snr", "x0"):
            raise SnapcError(f"unknown loss weighting {self.weighting!r}; use truncated-snr "
                             "or x0")
        if not 0.0 <= self.alpha_floor < 1.0:
            raise SnapcError(f"alpha floor must be in [0, 1), not {self.alpha_floor}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise SnapcError(f"--caption-dropout must be in [0, 1), not {self.caption_dropout}")

    def to_json(self) -> dict:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Round:
    """One progressive round: a teacher of ``teacher_steps`` steps teaches a student of
    half as many. ``index`` counts from 1."""

    index: int
    teacher_steps: int
    student_steps: int

    @property
    def key(self) -> str:
        """Return the round's folder name, e.g. ``round-1-32to16``."""
        return f"round-{self.index}-{self.teacher_steps}to{self.student_steps}"


def plan_rounds(start_steps: int, steps: int) -> list[Round]:
    """Return the rounds from ``start_steps`` down to ``steps`` (halving each round).

    Raises ValueError unless ``start_steps`` is ``steps`` times a power of two >= 2.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, not {steps}")
    ratio, rest = divmod(start_steps, steps)
    if rest or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"start steps {start_steps} is not {steps} times a power of two "
                         f">= 2 (e.g. {steps * 8}); each round halves the steps")
    rounds, n = [], start_steps
    while n > steps:
        rounds.append(Round(len(rounds) + 1, n, n // 2))
        n //= 2
    return rounds


def round_times(student_steps: int) -> torch.Tensor:
    """Return the (n, 3) long tensor of (t, t', t'') per student interval (t'' = END last)."""
    student = ddim_timesteps(student_steps, "trailing") + [END]
    teacher = ddim_timesteps(2 * student_steps, "trailing")
    rows = [(student[i], teacher[2 * i + 1], student[i + 1]) for i in range(student_steps)]
    for t, mid, end in rows:
        if not t > mid > end:
            raise ValueError(f"trailing grids of {student_steps} and {2 * student_steps} steps "
                             f"do not interleave at ({t}, {mid}, {end})")
    return torch.tensor(rows, dtype=torch.long)


def _coefs(abar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (alpha, sigma) of (B,) timesteps as (B, 1, 1, 1); END gives (1, 0)."""
    a = torch.where(t < 0, torch.ones_like(abar[:1]), abar[t.clamp(min=0)])
    shape = (-1, 1, 1, 1)
    return a.sqrt().view(shape), (1 - a).clamp(min=0).sqrt().view(shape)


def _x0(z: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
        bound: float) -> torch.Tensor:
    return ((z - sigma * eps) / alpha).clamp(-bound, bound)


def ddim_step(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              abar: torch.Tensor, *, bound: float = 1.0,
              alpha_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (z_s, x0) of one clipped DDIM step from per-row timesteps t to s (the sampler's
    step, x0 clipped to [-bound, bound] and divided by max(alpha_t, alpha_floor); z_s is x0
    where s is END)."""
    alpha_t, sigma_t = _coefs(abar, t)
    alpha_s, sigma_s = _coefs(abar, s)
    x0 = _x0(z, eps, alpha_t.clamp(min=alpha_floor), sigma_t, bound)
    return alpha_s * x0 + sigma_s * (z - alpha_t * x0) / sigma_t, x0


def distillation_target(z_t: torch.Tensor, z_end: torch.Tensor, t: torch.Tensor,
                        t_end: torch.Tensor, abar: torch.Tensor, *,
                        bound: float = 1.0) -> torch.Tensor:
    """Return the x0 (clipped to [-bound, bound]) whose one DDIM step from (z_t, t) lands on
    z_end at t_end."""
    alpha, sigma = _coefs(abar, t)
    alpha_e, sigma_e = _coefs(abar, t_end)
    ratio = sigma_e / sigma
    return ((z_end - ratio * z_t) / (alpha_e - ratio * alpha)).clamp(-bound, bound)


def _call(unet: nn.Module, z: torch.Tensor, t: torch.Tensor,
          context: torch.Tensor) -> torch.Tensor:
    return unet(z, t.float(), context, return_dict=False)[0].float()


class _Teacher:
    """The round's teacher as an eps function: CFG with ``guidance`` (two calls, batched)
    or, for a guidance-embedded teacher, one conditional call."""

    def __init__(self, unet: nn.Module, uncond: torch.Tensor | None, guidance: float) -> None:
        self.unet, self.uncond, self.guidance = unet, uncond, guidance

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.uncond is None:
            return _call(self.unet, z, t, context)
        uncond = self.uncond.expand(len(z), *context.shape[1:])
        both = _call(self.unet, torch.cat([z, z]), torch.cat([t, t]),
                     torch.cat([uncond, context]))
        eps_u, eps_c = both.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)


class StepDistillation:
    """One progressive round: the student's DDIM step t -> t'' matches the teacher's two.

    ``teacher`` is the round's teacher UNet (frozen); ``uncond`` the empty caption's states
    when the teacher needs CFG (round 1), None for a guidance-embedded teacher. The student
    starts as a copy of the teacher. ``data`` provides clean scenes and captions
    (``clean(gen, n)``); its batch size and seed are the run's, and ``stream`` (the round
    number) gives each round its own batches. ``identity`` (model, weights hash, round) goes
    into :meth:`describe`, so a checkpoint of another model or round refuses to resume.
    ``x0_bound`` is the sampler's x0 clip (1: pixels; shapes-latent: its latent range);
    ``teacher_floor`` the alpha floor the teacher is sampled with (0 for the original model;
    a latent student's stored floor when it teaches the next round).
    """

    name = "step-distillation"
    find_unused_parameters = False

    def __init__(self, teacher: nn.Module, data: NoisedBatches, *, student_steps: int,
                 guidance: float, uncond: torch.Tensor | None, loss: StepLoss = StepLoss(),
                 stream: int = 0, identity: dict[str, Any] | None = None,
                 x0_bound: float = 1.0, teacher_floor: float = 0.0) -> None:
        device = data.device
        self.teacher_module = teacher.to(device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher_module).requires_grad_(True).train()
        self.teacher = _Teacher(self.teacher_module,
                                None if uncond is None else uncond.to(device), guidance)
        self.data, self.weights = data, loss
        self.student_steps, self.guidance = student_steps, float(guidance)
        self.times = round_times(student_steps).to(device)
        self.abar = data.schedule.alphas_cumprod.to(device)
        self.stream, self.identity = stream, dict(identity or {})
        self.x0_bound, self.teacher_floor = float(x0_bound), float(teacher_floor)

    def batch(self, step: int, world: World) -> Batch:
        """Return this rank's slice of global batch ``step``: z_t, the interval's three
        timesteps and the captions."""
        gen = batch_generator(self.data.seed, step, self.data.device, stream=self.stream)
        n = self.data.batch_size
        x0, context = self.data.clean(gen, n)
        interval = torch.randint(0, self.student_steps, (n,), generator=gen,
                                 device=self.data.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.data.device)
        times = self.times[interval]
        alpha, sigma = _coefs(self.abar, times[:, 0])
        rows = world.local_slice(n)
        return {"z": (alpha * x0 + sigma * noise)[rows], "times": times[rows],
                "context": context[rows], "step": step}

    @torch.no_grad()
    def target(self, batch: Batch) -> torch.Tensor:
        """Return x0_target: the x0 of the one step that lands where the teacher's two do."""
        z, times, context = batch["z"], batch["times"], batch["context"]
        t, mid, end = times.unbind(1)
        step = {"bound": self.x0_bound, "alpha_floor": self.teacher_floor}
        z_mid, _ = ddim_step(z, self.teacher(z, t, context), t, mid, self.abar, **step)
        z_end, _ = ddim_step(z_mid, self.teacher(z_mid, mid, context), mid, end, self.abar,
                             **step)
        return distillation_target(z, z_end, t, end, self.abar, bound=self.x0_bound)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted x0-space loss of the student's one step and its parts."""
        target = self.target(batch)
        z, t = batch["z"], batch["times"][:, 0]
        alpha, sigma = _coefs(self.abar, t)
        eps = _call(model, z, t, batch["context"])
        x0 = _x0(z, eps, alpha.clamp(min=self.weights.alpha_floor), sigma, self.x0_bound)
        per_row = ((x0 - target) ** 2).mean(dim=(1, 2, 3))
        weight = torch.ones_like(per_row)
        if self.weights.weighting == "truncated-snr":
            snr = (alpha / sigma).view(-1) ** 2
            weight = snr.clamp(min=1.0)
        loss = (weight * per_row).mean()
        return loss, {"x0_mse": per_row.mean().item()}

    def describe(self) -> dict[str, Any]:
        """Return the round's settings (checked on resume, written in the record)."""
        return {"method": self.name, "student_steps": self.student_steps,
                "teacher_steps": 2 * self.student_steps, "guidance": self.guidance,
                "teacher_cfg": self.teacher.uncond is not None, "spacing": "trailing",
                "stream": self.stream, "x0_bound": self.x0_bound,
                "teacher_floor": self.teacher_floor,
                "loss": self.weights.to_json(), "data": self.data.describe(), **self.identity}
