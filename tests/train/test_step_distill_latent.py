"""Step distillation on the shapes-latent family (CPU): the student's sampler takes exactly the
step its loss trains (latent clip bound and alpha floor), a few steps lower the loss, and a run
through the CLI writes a folder whose stored sampler `snapc evaluate` uses.

The runs use a miniature latent UNet (a pruned folder with base ``shapes-latent``: random
weights, the latent inputs) with the shipped autoencoder and text encoder, so a whole run takes
seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from snapc.cli import app
from snapc.evaluation_latent import evaluate_latent, load_latent_pipeline
from snapc.pruned import load_pruned_unet, read_record
from snapc.shapes.model import encode_captions
from snapc.shapes.sampler import SamplerSpec
from snapc.shapes.schedule import alphas_cumprod
from snapc.shapes_latent.family import LatentScenes, x0_bound
from snapc.shapes_latent.pipeline import sample_latents
from snapc.train import StepDistillation, TrainOptions, train
from snapc.train.distributed import World
from snapc.train.steps import END, ddim_step
from tests.train.mini_models import mini_config, mini_pruned_folder

MINI_CONFIG = mini_config(channels=4, size=16)
CPU = World(0, 1, torch.device("cpu"))
FLOOR = 0.05  # StepLoss's default alpha floor: the latent students' sampler floor


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A pruned shapes-latent folder holding a miniature random latent UNet."""
    return mini_pruned_folder(tmp_path_factory.mktemp("mini"), "shapes-latent-mini",
                              base="shapes-latent", config=MINI_CONFIG)


class _EpsTable:
    """A denoiser returning a fixed eps per timestep (the sampler's calls are recorded)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        gen = torch.Generator().manual_seed(1)
        self.eps = {t: torch.randn(shape, generator=gen) for t in (999, 499)}
        self.calls: list[int] = []

    def __call__(self, x, t, context, return_dict=False):
        self.calls.append(len(x))
        return (self.eps[int(t[0])],)


def test_student_sampler_takes_the_step_its_loss_trains() -> None:
    """sample_latents with the student's sampler (2 trailing steps, guidance built in, the
    floor, the latent bound) is ddim_step twice, as StepDistillation computes it."""
    abar = alphas_cumprod()
    bound = x0_bound()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    table = _EpsTable(tuple(z.shape))
    got = sample_latents(table, torch.zeros(2, 20, 128), None, steps=2, noise=z,
                         x0_range=bound, spacing="trailing", guidance_embedded=True,
                         alpha_floor=FLOOR)
    assert table.calls == [2, 2]  # one conditional call per step
    row = torch.ones(2, dtype=torch.long)
    step = {"bound": bound, "alpha_floor": FLOOR}
    z_mid, _ = ddim_step(z, table.eps[999], 999 * row, 499 * row, abar, **step)
    _, x0 = ddim_step(z_mid, table.eps[499], 499 * row, END * row, abar, **step)
    torch.testing.assert_close(got, x0, atol=1e-5, rtol=1e-5)
    assert 1.0 < got.abs().max() <= bound  # clipped to the latent range, not to pixels


def test_a_few_steps_lower_the_latent_distillation_loss(mini, tmp_path) -> None:
    teacher = load_pruned_unet(mini)
    data = LatentScenes(4, 0, CPU.device, caption_dropout=0.0)
    method = StepDistillation(teacher, data, student_steps=2, guidance=3.0,
                              uncond=encode_captions([""], data.text), x0_bound=x0_bound())
    fixed = method.batch(0, CPU)
    before = method.loss(method.student, fixed)[0].item()

    class Fixed:
        name, student, find_unused_parameters = method.name, method.student, False

        def batch(self, step, world):
            return fixed

        def loss(self, model, batch):
            return method.loss(model, batch)

        def describe(self):
            return method.describe()

    result = train(Fixed(), TrainOptions(steps=8, batch=4, lr=1e-3, warmup=1, ema=0.0,
                                         device="cpu", log_every=1), tmp_path / "ck",
                   world=CPU)
    with torch.no_grad():
        after = method.loss(result.student, fixed)[0].item()
    assert after < 0.7 * before, (before, after)
    assert method.describe()["x0_bound"] == pytest.approx(x0_bound())


def test_cli_distils_a_latent_model_and_evaluate_samples_it_as_stored(mini, tmp_path) -> None:
    out = tmp_path / "latent-fast"
    result = CliRunner().invoke(app, [
        "distill", str(mini), "--sampling-steps", "1", "--start-steps", "4",
        "--steps-per-round", "2", "--batch", "4", "--warmup", "1", "--train-device", "cpu",
        "-o", str(out)])
    assert result.exit_code == 0, result.output
    spec = SamplerSpec(steps=1, guidance=3.0, spacing="trailing", guidance_embedded=True,
                       alpha_floor=FLOOR)
    record = read_record(out)
    assert record.base == "shapes-latent" and record.sampler == spec.to_json()
    training = json.loads((out / "training.json").read_text())
    rounds = [r["method"] for r in training["rounds"]]
    assert [r["teacher_floor"] for r in rounds] == [0.0, FLOOR]  # original, then a student
    assert [r["teacher_cfg"] for r in rounds] == [True, False]
    assert rounds[0]["x0_bound"] == pytest.approx(x0_bound())
    assert load_latent_pipeline(str(out)).sampler == spec
    scores = evaluate_latent(str(out), prompts=2)
    assert (scores["steps"], scores["spacing"], scores["guidance_embedded"],
            scores["alpha_floor"], scores["unet_calls_per_image"]) == (
        1, "trailing", True, FLOOR, 1)
    assert evaluate_latent(str(out), prompts=2, steps=2)["unet_calls_per_image"] == 2
