"""The DDIM sampler's timestep spacing, guidance built into the denoiser, and SamplerSpec."""

import pytest
import torch
from diffusers import DDIMScheduler

from snapc.quality import EVAL_GUIDANCE, EVAL_STEPS
from snapc.shapes.sampler import SamplerSpec, ddim_timesteps, sample
from snapc.shapes.schedule import TRAIN_STEPS, alphas_cumprod


class Recorder:
    """A denoiser predicting zero noise that records each call's batch, timestep and context."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, torch.Tensor]] = []

    def __call__(self, x, t, context):
        self.calls.append((x.shape[0], float(t[0]), context))
        return torch.zeros_like(x)


def test_trailing_matches_diffusers_ddim():
    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_STEPS, timestep_spacing="trailing")
    assert ddim_timesteps(4, "trailing") == [999, 749, 499, 249]
    for steps in (1, 2, 3, 4, 6, 7, 8, 16, 25, 50, 333, 1000):
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(steps, "trailing") == scheduler.timesteps.tolist(), steps


def test_trailing_keeps_steps_where_diffusers_overruns():
    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_STEPS, timestep_spacing="trailing")
    scheduler.set_timesteps(61)  # float rounding: 62 timesteps, the last one -1
    assert len(scheduler.timesteps) == 62 and int(scheduler.timesteps[-1]) == -1
    assert ddim_timesteps(61, "trailing") == scheduler.timesteps[:61].tolist()
    for steps in range(1, TRAIN_STEPS + 1):
        times = ddim_timesteps(steps, "trailing")
        assert len(times) == steps and times[-1] >= 0 and times == sorted(times, reverse=True)


def test_linspace_is_unchanged_and_bad_spacing_raises():
    assert ddim_timesteps(4) == ddim_timesteps(4, "linspace") == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(4, "leading")


def test_sampler_visits_the_trailing_timesteps():
    unet = Recorder()
    context = torch.zeros(2, 20, 128)
    sample(unet, context, torch.ones(1, 20, 128), steps=4, spacing="trailing",
           generator=torch.Generator().manual_seed(0))
    assert [t for _, t, _ in unet.calls] == [999.0, 749.0, 499.0, 249.0]


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_guidance_embedded_calls_the_denoiser_once_per_step(batch_cfg):
    context, uncond = torch.zeros(3, 20, 128), torch.ones(1, 20, 128)
    embedded, cfg = Recorder(), Recorder()
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sample(embedded, context, uncond, steps=4, noise=noise, guidance_embedded=True,
           batch_cfg=batch_cfg)
    assert len(embedded.calls) == 4
    assert all(b == 3 and torch.equal(c, context) for b, _, c in embedded.calls)
    sample(cfg, context, uncond, steps=4, noise=noise, batch_cfg=batch_cfg)
    assert sum(b for b, _, _ in cfg.calls) == 2 * 4 * 3  # CFG: both halves every step


def test_guidance_embedded_ignores_guidance_and_uncond():
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 1, 1) * 0.1

    def unet(x, t, context):
        return torch.nn.functional.conv2d(x, weight) + context.mean()

    context = torch.randn(2, 20, 128)
    noise = torch.randn(2, 3, 32, 32)
    a = sample(unet, context, torch.randn(1, 20, 128), steps=3, noise=noise,
               guidance_embedded=True, guidance=7.0)
    b = sample(unet, context, None, steps=3, noise=noise)
    assert torch.equal(a, b)


def test_sampler_spec_defaults_round_trip_and_errors():
    spec = SamplerSpec()
    assert (spec.steps, spec.guidance) == (EVAL_STEPS, EVAL_GUIDANCE)
    assert spec.spacing == "linspace" and not spec.guidance_embedded
    assert spec.unet_calls_per_image == 50
    assert SamplerSpec.from_json(None) == spec
    fast = SamplerSpec(steps=4, guidance=3, spacing="trailing", guidance_embedded=True)
    assert fast.unet_calls_per_image == 4 and isinstance(fast.guidance, float)
    assert SamplerSpec.from_json(fast.to_json()) == fast
    assert fast.to_json() == {"steps": 4, "guidance": 3.0, "spacing": "trailing",
                              "guidance_embedded": True, "alpha_floor": 0.0}
    assert SamplerSpec.from_json({"steps": 8}) == SamplerSpec(steps=8)
    for bad, message in [({"steps": 0}, "steps"), ({"spacing": "leading"}, "spacing"),
                         ({"prediction": "v"}, "unknown field"), ({"steps": 2.5}, "steps"),
                         ({"guidance_embedded": "yes"}, "guidance_embedded"), ([4], "object"),
                         ({"alpha_floor": 1.0}, "alpha_floor"),
                         ({"alpha_floor": True}, "alpha_floor")]:
        with pytest.raises(ValueError, match=message):
            SamplerSpec.from_json(bad)


def test_alpha_floor_reads_a_one_step_output_as_x0_over_the_floor():
    """With a floor f, x0 = (x - sigma eps) / max(alpha, f): at t = 999 (alpha 4.9e-5) a
    residual x - sigma eps = 0.01 x becomes x0 = 0.2 x; without the floor it clips."""
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    context = torch.zeros(2, 4, 8)
    ab = alphas_cumprod()

    def eps_of(x, t, c):
        return (x - 0.01 * x) / (1 - ab[int(t[0])]).sqrt()

    kw = {"steps": 1, "noise": noise, "guidance_embedded": True, "spacing": "trailing"}
    floored = sample(eps_of, context, None, alpha_floor=0.05, **kw)
    assert torch.allclose(floored, (0.2 * noise).clamp(-1, 1), atol=1e-4)
    assert (sample(eps_of, context, None, **kw).abs() == 1).float().mean() > 0.99
