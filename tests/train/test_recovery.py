"""Recovery distillation end to end on CPU: the loss falls, removed blocks stay removed, the
weights reach the compiled artifact, a killed run resumes exactly, two gloo processes match
one, and bad input is a one-line error with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from snapc.models import load_model
from snapc.pruned import SkipTransformer, load_pruned_unet
from snapc.testing import one_error_line
from snapc.train import RecoveryDistillation, RecoveryLoss
from snapc.train.data import TeacherSamples
from snapc.train.distributed import World

REMOVE = "mid_block.attentions.0"
# A run small enough for CPU: batch 8, a pool of 8 teacher samples, checkpoints every 2 steps.
RUN = ["distill", "tiny", "--remove", REMOVE, "--batch", "8", "--pool", "8", "--lr", "1e-3",
       "--warmup", "2", "--checkpoint-every", "2", "--seed", "3"]
STEPS = "12"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m snapc ARGS` and return the finished process."""
    return subprocess.run([sys.executable, "-m", "snapc", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def recovered(tmp_path_factory) -> Path:
    """Return the folder of an uninterrupted 12-step recovery of tiny."""
    out = tmp_path_factory.mktemp("recovered") / "D"
    proc = snapc(*RUN, "--steps", STEPS, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_loss_falls() -> None:
    loaded = load_model("tiny")
    sample, _, context = loaded.example_inputs
    world = World(0, 1, torch.device("cpu"))
    data = TeacherSamples(loaded.module, torch.randn(4, *context.shape[1:]), None,
                          sample_shape=tuple(sample.shape[1:]), base="tiny", batch_size=8,
                          seed=0, device=world.device, pool=8, sampling_steps=4)
    method = RecoveryDistillation(loaded.module, [REMOVE, "up_blocks.1.resnets.2"], data,
                                  RecoveryLoss(task=0.0))  # a random teacher: KD only
    probe = method.batch(10_000, world)  # a batch the training never draws
    opt = torch.optim.AdamW(method.student.parameters(), lr=1e-3)

    def probe_loss() -> float:
        with torch.no_grad():
            return method.loss(method.student, probe)[0].item()

    before = probe_loss()
    for step in range(15):
        loss, _ = method.loss(method.student, method.batch(step, world))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe_loss()
    assert after < 0.8 * before, (before, after)


def test_removed_blocks_stay_removed_and_weights_reach_the_artifact(recovered, tmp_path):
    record = json.loads((recovered / "snapc_pruned.json").read_text())
    assert record["removed_blocks"] == [REMOVE] and record["base"] == "tiny"
    training = json.loads((recovered / "training.json").read_text())
    assert training["steps"] == int(STEPS) and training["options"]["seed"] == 3
    unet = load_pruned_unet(recovered)
    assert isinstance(unet.mid_block.attentions[0], SkipTransformer)
    assert not any(k.startswith(f"{REMOVE}.") for k in _weights(recovered))
    original = load_model("tiny").module.state_dict()
    trained = _weights(recovered)
    changed = [k for k in trained if not torch.equal(trained[k], original[k])]
    assert len(changed) > 0.5 * len(trained)  # training moved the weights

    out = tmp_path / "onnx"
    proc = snapc("compile", str(recovered), "--target", "onnx", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["removed_blocks"] == [REMOVE]
    assert manifest["verification"]["psnr_db"] >= 60
    import onnxruntime as ort

    inputs = load_model("tiny").example_inputs
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        want = unet(*inputs, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_killed_run_resumes_to_the_same_weights(recovered, tmp_path):
    out = tmp_path / "D"
    checkpoints = tmp_path / "D.checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "snapc", *RUN, "--steps", STEPS,
                             "-o", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(checkpoints.rglob("step-*.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(checkpoints.rglob("step-*.pt"))
    again = snapc(*RUN, "--steps", STEPS, "-o", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent restart
    resumed = snapc(*RUN, "--steps", STEPS, "-o", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoints.exists()
    want, got = _weights(recovered), _weights(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    runs = json.loads((out / "training.json").read_text())["runs"]
    assert len(runs) == 2 and runs[1]["start_step"] > 0


def test_two_gloo_processes_match_one(recovered, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "snapc", *RUN, "--steps", STEPS, "-o", str(out), "--train-device", "cpu"],
        capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    assert record["world_size"] == 2
    want, got = _weights(recovered), _weights(out)
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst < 1e-4, worst


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from snapc.train import TrainingDivergedError, TrainOptions, train

    class Diverging:
        name = "toy"
        find_unused_parameters = False

        def __init__(self) -> None:
            self.student = torch.nn.Linear(2, 1)

        def batch(self, step: int, world: World) -> dict:
            return {"x": torch.ones(4, 2), "step": step}

        def loss(self, model, batch):
            loss = model(batch["x"]).pow(2).mean()
            return (loss * float("nan") if batch["step"] == 3 else loss), {}

        def describe(self) -> dict:
            return {"method": self.name}

    with pytest.raises(TrainingDivergedError, match="step 4.*step-0000002"):
        train(Diverging(), TrainOptions(steps=10, checkpoint_every=2), tmp_path,
              world=World(0, 1, torch.device("cpu")))
    assert [p.name for p in tmp_path.glob("step-*.pt")] == ["step-0000002.pt"]


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    checkpoints = tmp_path / "D.checkpoints" / "recovery"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-0000002.pt").write_bytes(b"not a checkpoint")
    proc = snapc(*RUN, "--steps", "4", "-o", str(tmp_path / "D"), "--resume")
    assert "corrupt checkpoint" in one_error_line(proc)
    assert not (tmp_path / "D").exists()


@pytest.mark.parametrize("extra,message", [
    (["--remove", "mid_block.attentions.7", "--steps", "2"], "unknown block"),
    (["--remove", REMOVE], "--steps N or --minutes M"),
    (["--remove", REMOVE, "--budget", "0.5", "--steps", "2"], "one of the two"),
    (["--device", "iphone99", "--budget", "0.5", "--steps", "2"], "unknown device"),
    (["--device", "iphone14pro-ane", "--budget", "0.01", "--steps", "2"], "out of reach"),
    (["--remove", REMOVE, "--steps", "2", "--conditioning", "WIDE"], "width 32"),
])
def test_bad_input_is_a_one_line_error(tmp_path, extra, message):
    wide = tmp_path / "wide.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(2, 16, 48)}, str(wide))
    extra = [str(wide) if a == "WIDE" else a for a in extra]
    proc = snapc("distill", "tiny", "--batch", "4", "--pool", "4", *extra,
                 "-o", str(tmp_path / "D"))
    assert message in one_error_line(proc)
    assert not (tmp_path / "D").exists()


def test_compile_recover_needs_a_budget(tmp_path):
    proc = snapc("compile", "tiny", "--target", "onnx", "-o", str(tmp_path / "A"),
                 "--recover", "1")
    assert "--recover needs --device and --budget" in one_error_line(proc)
    assert not (tmp_path / "A").exists()
