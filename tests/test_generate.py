"""`snapc generate`: prompts in, PNGs out through the compiled components alone, matching the
PyTorch pipeline; bad input is a one-line error with exit 2 and no output folder."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from snapc.cli import app
from snapc.compiler import CompileOptions
from snapc.components import compile_components
from snapc.generate import load_artifact
from snapc.quality import generate as torch_generate
from snapc.shapes.captions import parse_caption
from snapc.shapes.data import N_CODES, N_OBJECTS, caption, decode
from snapc.shapes.model import load_text_encoder, load_unet
from snapc.testing import one_error_line

PROMPTS = ("a large blue square at the center",
           "a small red circle at the top left and a large green cross at the bottom right")


def generate_cli(*args: str):
    return CliRunner().invoke(app, ["generate", *args])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "A"
    compile_components(CompileOptions(model="shapes", target="onnx", out=out,
                                      target_options={"simplify": False}),
                       ["unet", "text_encoder"])
    return out


def test_parse_caption_round_trips():
    rng = random.Random(0)
    codes = [*range(N_OBJECTS), *rng.sample(range(N_OBJECTS, N_CODES), 2000)]
    assert all(parse_caption(caption(c)) == c for c in codes)
    for bad in ("a red circle at the top", "a small red circle at the middle",
                "a small red circle at the top and a small red circle at the left and a small "
                "red circle at the right"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_generate_writes_pngs_grid_and_json(artifact, tmp_path):
    out = tmp_path / "imgs"
    args = [str(artifact), "--steps", "4", "--json", "-o", str(out)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = generate_cli(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["prompts"] == 2 and data["scored"] == 2 and data["sampler"]["steps"] == 4
    assert [r["prompt"] for r in data["images"]] == list(PROMPTS)
    for record in data["images"]:
        assert isinstance(record["matches"], bool) and record["decoded"]
        assert Image.open(out / record["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > 64
    assert json.loads((out / "results.json").read_text())["images"] == data["images"]


def test_compiled_pictures_equal_the_torch_pipeline(artifact, tmp_path):
    from snapc.generate import generate

    images, records = generate(load_artifact(artifact), list(PROMPTS), steps=2, seed=1)
    codes = torch.tensor([parse_caption(p) for p in PROMPTS])
    reference = torch_generate(load_unet(), load_text_encoder(), codes, steps=2, seed=1)
    # x0 at t = 999 divides by sqrt(alpha_bar) ~ 0.006 and CFG 3 amplifies float noise: torch
    # alone moves pixels by ~4e-3 between batch sizes 1 and 2, so compare mean and max
    diff = (images - reference).abs()
    assert diff.mean() < 1e-3 and diff.max() < 5e-2, (diff.mean(), diff.max())
    assert decode(images) == decode(reference)
    for prompt, record in zip(PROMPTS, records, strict=True):
        assert record["matches"] == (record["decoded"] == prompt)  # both in reading order


def _fake_artifact(folder, target: str):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"target": target, "model": {"name": "shapes"}, "inputs": []}))
    return folder


@pytest.mark.parametrize(("extra", "expected"), [
    (["--prompt", "a small purple circle at the top"], "does not know (purple)"),
    (["--prompt", " ".join(["a"] * 21)], "at most 20"),
    (["--prompts-file", "missing.txt"], "prompts file missing.txt not found"),
    ([], "no prompts"),
])
def test_bad_prompts_are_one_line(artifact, tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    result = generate_cli(str(artifact), "-o", "imgs", *extra)
    assert expected in one_error_line(result)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("target", "expected"), [
    ("onnx", "without a text encoder"),
    ("coreml", "Core ML runs only on macOS"),
])
def test_artifacts_it_cannot_run_are_one_line(tmp_path, target, expected):
    folder = _fake_artifact(tmp_path / "A", target)
    out = tmp_path / "imgs"
    result = generate_cli(str(folder), "--prompt", PROMPTS[0], "-o", str(out))
    assert expected in one_error_line(result)
    assert not out.exists()
