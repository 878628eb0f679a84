"""Step distillation on CPU: the round math, the loss falls on a fixed batch, rounds resume after
a stop, the stored sampler reaches the ONNX manifest and snapc evaluate, and bad input is one
`error:` line (exit 2) with no output folder left.

The runs use a miniature shapes-family UNet (a pruned folder with base ``shapes``: 0.28 M
random parameters, the shapes inputs) so that a whole multi-round run takes seconds; the math
is the same for the shipped model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from snapc.cli import app
from snapc.compiler import CompileOptions, compile_model
from snapc.evaluation import evaluate_model, load_denoiser
from snapc.manifest import MANIFEST_NAME
from snapc.pruned import SkipTransformer, load_pruned_unet, read_record
from snapc.shapes.model import encode_captions
from snapc.shapes.sampler import SamplerSpec
from snapc.shapes.schedule import alphas_cumprod
from snapc.testing import one_error_line
from snapc.train import StepDistillation, StepOptions, TrainOptions, distill_steps, train
from snapc.train.data import ShapesScenes
from snapc.train.distill import checkpoint_folder
from snapc.train.distributed import World
from snapc.train.steps import (
    END,
    _coefs,
    ddim_step,
    distillation_target,
    plan_rounds,
    round_times,
)
from tests.train.mini_models import mini_config, mini_pruned_folder

MINI_CONFIG = mini_config(channels=3, size=32)
REMOVED = ("mid_block.attentions.0",)
# 4 -> 2 -> 1 steps, 4 training steps a round at batch 4, a checkpoint every 2 steps.
RUN = ["--sampling-steps", "1", "--start-steps", "4", "--steps-per-round", "4", "--batch", "4",
       "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2", "--train-device", "cpu"]
CPU = World(0, 1, torch.device("cpu"))


def invoke(*args: str):
    return CliRunner().invoke(app, ["distill", *args])


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A pruned shapes-family folder holding a miniature random UNet (one block removed)."""
    return mini_pruned_folder(tmp_path_factory.mktemp("mini"), "shapes-mini", base="shapes",
                              config=MINI_CONFIG, removed=REMOVED)


@pytest.fixture(scope="module")
def distilled(mini, tmp_path_factory) -> Path:
    """The miniature model distilled 4 -> 2 -> 1 steps through the CLI, rounds kept."""
    out = tmp_path_factory.mktemp("distilled") / "shapes-mini-fast"
    result = invoke(str(mini), *RUN, "--keep-rounds", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_rounds_halve_on_interleaved_trailing_grids() -> None:
    assert [(r.teacher_steps, r.student_steps) for r in plan_rounds(32, 4)] == [
        (32, 16), (16, 8), (8, 4)]
    assert plan_rounds(32, 4)[0].key == "round-1-32to16"
    for start, steps in ((24, 4), (4, 4), (2, 4)):
        with pytest.raises(ValueError, match="power of two"):
            plan_rounds(start, steps)
    assert round_times(4).tolist() == [[999, 874, 749], [749, 624, 499], [499, 374, 249],
                                       [249, 124, END]]
    assert round_times(1).tolist() == [[999, 499, END]]


def test_target_x0_makes_one_step_land_on_the_two() -> None:
    """x0_target = (z'' - s''/s z) / (a'' - s''/s a): one DDIM step from z_t with it reaches
    the teacher's z_t'' (the progressive-distillation identity), at every interval."""
    abar = alphas_cumprod().double()  # float64: at t = 999 alpha is 5e-5
    gen = torch.Generator().manual_seed(0)
    times = round_times(4)
    z = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    t, mid, end = times.unbind(1)
    eps_a, eps_b = (0.9 * torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
                    for _ in range(2))
    z_mid, _ = ddim_step(z, eps_a, t, mid, abar)
    z_end, _ = ddim_step(z_mid, eps_b, mid, end, abar)
    target = distillation_target(z, z_end, t, end, abar)
    assert target.abs().max() <= 1.0
    alpha, sigma = _coefs(abar, t)
    eps_for_target = (z - alpha * target) / sigma  # the eps whose x0 is the target
    one, x0 = ddim_step(z, eps_for_target, t, end, abar)
    torch.testing.assert_close(x0, target, atol=1e-9, rtol=0)  # its x0 needs no clipping
    torch.testing.assert_close(one, z_end, atol=1e-9, rtol=0)


class _FixedBatch:
    """A method that trains on one batch only (its step-0 batch)."""

    def __init__(self, method: StepDistillation) -> None:
        self.method, self.fixed = method, method.batch(0, CPU)
        self.name, self.student = method.name, method.student
        self.find_unused_parameters = False

    def batch(self, step, world):
        return self.fixed

    def loss(self, model, batch):
        return self.method.loss(model, batch)

    def describe(self):
        return self.method.describe()


def test_a_few_steps_lower_the_distillation_loss(mini, tmp_path) -> None:
    teacher = load_pruned_unet(mini)
    data = ShapesScenes(4, 0, CPU.device)
    method = StepDistillation(teacher, data, student_steps=2, guidance=3.0,
                              uncond=encode_captions([""], data.text))
    fixed = _FixedBatch(method)
    before = method.loss(method.student, fixed.fixed)[0].item()
    result = train(fixed, TrainOptions(steps=8, batch=4, lr=1e-3, warmup=1, ema=0.0,
                                       device="cpu", log_every=1), tmp_path / "ck", world=CPU)
    with torch.no_grad():
        after = method.loss(result.student, fixed.fixed)[0].item()
    assert after < 0.7 * before, (before, after)
    # the teacher is untouched and the student keeps the removed block removed
    assert isinstance(method.student.mid_block.attentions[0], SkipTransformer)
    assert not any(p.requires_grad for p in method.teacher_module.parameters())


def test_output_folder_stores_the_sampler_and_keeps_removed_blocks(distilled) -> None:
    record = read_record(distilled)
    assert record.removed == REMOVED and record.base == "shapes"
    assert record.sampler == SamplerSpec(steps=1, guidance=3.0, spacing="trailing",
                                         guidance_embedded=True).to_json()
    assert isinstance(load_pruned_unet(distilled).mid_block.attentions[0], SkipTransformer)
    training = json.loads((distilled / "training.json").read_text())
    assert [(r["teacher_steps"], r["student_steps"], r["steps"]) for r in training["rounds"]] \
        == [(4, 2, 4), (2, 1, 4)]
    assert training["rounds"][0]["method"]["teacher_cfg"] is True
    assert training["rounds"][1]["method"]["teacher_cfg"] is False
    kept = read_record(distilled / "rounds" / "2-steps")
    assert SamplerSpec.from_json(kept.sampler).steps == 2 and kept.removed == REMOVED
    assert not checkpoint_folder(distilled).exists()


def test_sampler_reaches_the_manifest_and_evaluate(distilled, tmp_path) -> None:
    spec = SamplerSpec(steps=1, guidance=3.0, spacing="trailing", guidance_embedded=True)
    artifact = tmp_path / "onnx"
    compile_model(CompileOptions(model=str(distilled), target="onnx", out=artifact, batch=2))
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    assert manifest["sampler"] == spec.to_json() == manifest["model"]["sampler"]
    assert manifest["model"]["removed_blocks"] == list(REMOVED)
    assert load_denoiser(str(artifact)).sampler == spec
    result = evaluate_model(str(artifact), prompts=2)
    assert (result["steps"], result["guidance_embedded"], result["unet_calls_per_image"]) == (
        1, True, 1)


def test_stopped_run_resumes_the_right_round(mini, distilled, tmp_path) -> None:
    """Round 1 finishes, round 2 stops after its step-2 checkpoint; --resume skips round 1,
    continues round 2 from step 2 and ends with the uninterrupted run's weights."""
    out = tmp_path / "resumed"
    folder = checkpoint_folder(out)

    class Stop(Exception):
        pass

    def stop_in_round_2(phase, p):
        if phase.startswith("round-2") and p.step == 3:
            raise Stop

    options = StepOptions(model=str(mini), out=out, sampling_steps=1, start_steps=4)
    train_options = TrainOptions(steps=4, batch=4, lr=1e-3, warmup=1, device="cpu",
                                 checkpoint_every=2)
    with pytest.raises(Stop):
        distill_steps(options, train_options, progress=stop_in_round_2)
    assert (folder / "round-1-4to2.safetensors").is_file()
    assert (folder / "round-2-2to1" / "step-0000002.pt").is_file() and not out.exists()

    # resuming with another model or other steps is refused before anything loads
    line = one_error_line(invoke("shapes", *RUN, "--resume", "-o", str(out)))
    assert "mismatch" in line and "model" in line
    line = one_error_line(invoke(str(mini), *RUN[:2], "--start-steps", "8", *RUN[4:],
                                 "--resume", "-o", str(out)))
    assert "mismatch" in line and "start_steps" in line
    assert (folder / "round-2-2to1" / "step-0000002.pt").is_file()

    result = invoke(str(mini), *RUN, "--keep-rounds", "--resume", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "round-1-4to2: finished earlier" in result.output
    training = json.loads((out / "training.json").read_text())
    assert [run["start_step"] for run in training["rounds"][0]["runs"]] == [0]
    assert [run["start_step"] for run in training["rounds"][1]["runs"]] == [0, 2]
    for sub in ("", "rounds/2-steps"):
        mine = load_file(str(out / sub / "diffusion_pytorch_model.safetensors"))
        whole = load_file(str(distilled / sub / "diffusion_pytorch_model.safetensors"))
        assert mine.keys() == whole.keys()
        assert all(torch.equal(mine[k], whole[k]) for k in mine), sub
    assert not folder.exists()


def test_two_gloo_processes_match_one(mini, distilled, tmp_path) -> None:
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "snapc", "distill", str(mini), *RUN, "-o", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((out / "training.json").read_text())
    assert [r["world_size"] for r in training["rounds"]] == [2, 2]
    other = tmp_path / "seed-1"
    result = invoke(str(mini), *RUN, "--seed", "1", "-o", str(other))
    assert result.exit_code == 0, result.output
    want, got, reseeded = (load_file(str(f / "diffusion_pytorch_model.safetensors"))
                           for f in (distilled, out, other))

    def distance(a: dict, b: dict) -> torch.Tensor:
        return torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()

    # Not bit-equal: at t = 999 the teacher's x0 divides by alpha = 5e-5, so float rounding of
    # another batch split (or thread count, or CPU: AVX2 and AVX-512 machines differ by 2x)
    # moves clipped pixels, and Adam's first steps turn tiny gradient differences into full
    # lr-sized updates. What a DDP bug (unaveraged gradients, ranks drawing the same samples)
    # changes is the data each step sees: as much as another seed does.
    assert distance(want, got) < 0.5 * distance(want, reseeded), (
        distance(want, got), distance(want, reseeded))


@pytest.mark.parametrize("args, message", [
    (["--sampling-steps", "0"], "--sampling-steps must be >= 1"),
    (["--sampling-steps", "4", "--start-steps", "24"], "not 4 times a power of two"),
    (["--sampling-steps", "4", "--start-steps", "4"], "fewer than the teacher's 4 steps"),
    (["--sampling-steps", "2", "--guidance", "0.5"], "--guidance must be >= 1"),
    (["--sampling-steps", "2", "--remove", "mid_block.attentions.0"], "recover first"),
    (["--sampling-steps", "2", "--steps", "3"], "use --steps-per-round"),
    (["--guidance", "3"], "add --sampling-steps"),
    (["--sampling-steps", "2"], "--steps-per-round K or --minutes-per-round M"),
    (["--sampling-steps", "2", "--resume"], "no step-distillation run"),
])
def test_bad_input_is_one_line_before_loading(mini, tmp_path, args, message) -> None:
    out = tmp_path / "out"
    if message not in ("--steps-per-round K or --minutes-per-round M",):
        args = [*args, "--steps-per-round", "1"]
    assert message in one_error_line(invoke(str(mini), *args, "-o", str(out)))
    assert not out.exists() and not checkpoint_folder(out).exists()


def test_models_outside_shapes_or_with_guidance_built_in(distilled, tmp_path) -> None:
    out = tmp_path / "out"
    line = one_error_line(invoke("tiny", "--sampling-steps", "2", "--steps-per-round", "1",
                                 "-o", str(out)))
    assert "data-free step distillation" in line and "not supported yet" in line
    # a distilled model is its own teacher: its guidance is fixed, its steps are the start
    line = one_error_line(invoke(str(distilled / "rounds" / "2-steps"), "--sampling-steps", "1",
                                 "--guidance", "5", "--steps-per-round", "1", "-o", str(out)))
    assert "guidance 3 built in" in line
    line = one_error_line(invoke(str(distilled / "rounds" / "2-steps"), "--sampling-steps", "1",
                                 "--start-steps", "4", "--steps-per-round", "1", "-o", str(out)))
    assert "teacher/student mismatch" in line
    assert not out.exists()


def test_a_distilled_model_distils_further(distilled, tmp_path) -> None:
    """The 2-step student (guidance built in) is the teacher of a 2 -> 1 round: one call."""
    out = tmp_path / "again"
    result = invoke(str(distilled / "rounds" / "2-steps"), "--sampling-steps", "1",
                    "--steps-per-round", "1", "--batch", "2", "--train-device", "cpu", "--json",
                    "-o", str(out))
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["plan"]["start_steps"] == 2 and not training["plan"]["teacher_cfg"]
    assert SamplerSpec.from_json(read_record(out).sampler).steps == 1
