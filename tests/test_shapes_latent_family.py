"""shapes-latent as a model of snapc's generic tools: registered UNet, recovery, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from snapc.families import is_latent_family, is_shapes_family
from snapc.models import load_model


def test_registered_latent_unet_has_latent_inputs():
    loaded = load_model("shapes-latent", batch=2)
    sample, t, context = loaded.example_inputs
    assert sample.shape == (2, 4, 16, 16) and t.shape == (2,)
    assert loaded.info.name == "shapes-latent" and not loaded.info.random_weights
    assert is_latent_family("shapes-latent") and not is_shapes_family("shapes-latent")
    out = loaded.module(sample, t, context, return_dict=False)[0]
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_latent_scenes_are_encoded_latents():
    from snapc.shapes_latent.family import LatentScenes
    from snapc.train.distributed import World

    data = LatentScenes(4, seed=0, device=torch.device("cpu"))
    batch = data.batch(0, World(0, 1, torch.device("cpu")))
    assert batch["x_t"].shape == (4, 4, 16, 16) and batch["context"].shape[0] == 4
    again = data.batch(0, World(0, 1, torch.device("cpu")))
    assert torch.equal(batch["x_t"], again["x_t"])  # seeded by (seed, step)


def test_distill_latent_then_evaluate_and_compile(tmp_path):
    out = tmp_path / "d"
    run = [sys.executable, "-m", "snapc"]
    done = subprocess.run([*run, "distill", "shapes-latent", "--remove",
                           "mid_block.attentions.0", "--steps", "3", "--batch", "4", "-o",
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "snapc_pruned.json").read_text())
    assert record["base"] == "shapes-latent"
    assert record["removed_blocks"] == ["mid_block.attentions.0"]
    ev = subprocess.run([*run, "evaluate", str(out), "--prompts", "4", "--steps", "4",
                         "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert 0.0 <= json.loads(ev.stdout)["adherence"] <= 1.0
    comp = subprocess.run([*run, "compile", str(out), "--target", "onnx", "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert comp.returncode == 0, comp.stderr
