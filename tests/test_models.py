"""Loading real weights from disk: folders, bare files, and every way they can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from snapc.errors import UnknownNameError, WeightsError
from snapc.models import TINY_CONFIG, load_model


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """Return the state dict of `tiny` built with seed 7 (not the default seed 0)."""
    return {k: v.contiguous() for k, v in load_model("tiny", seed=7).module.state_dict().items()}


def _write_folder(folder, state, config=TINY_CONFIG, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                    **config}))
    if name.endswith(".safetensors"):
        save_file(state, str(folder / name))
    else:
        torch.save(state, folder / name)
    return folder


@pytest.mark.parametrize("weights_name", ["diffusion_pytorch_model.safetensors",
                                          "diffusion_pytorch_model.bin"])
def test_diffusers_folder_loads_exactly(tmp_path, tiny_state, weights_name):
    folder = _write_folder(tmp_path / "unet", tiny_state, name=weights_name)
    loaded = load_model(str(folder))
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, tiny_state[key], rtol=0, atol=0)
    assert not loaded.info.random_weights and len(loaded.info.weights_sha256) == 64


def test_bare_safetensors_with_arch(tmp_path, tiny_state):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_state, str(path))
    loaded = load_model(str(path), arch="tiny")
    key = "conv_in.weight"
    torch.testing.assert_close(loaded.module.state_dict()[key], tiny_state[key])
    assert loaded.info.name == "tiny:unet.safetensors"


def test_bare_file_needs_arch(tmp_path, tiny_state):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_state, str(path))
    with pytest.raises(WeightsError, match="--arch"):
        load_model(str(path))


def test_corrupt_file_names_the_file(tmp_path, tiny_state):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated download
    with pytest.raises(WeightsError, match=r"corrupt weights file .*unet\.safetensors"):
        load_model(str(path), arch="tiny")


def test_missing_key_names_the_first_bad_key(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["conv_out.bias"]
    path = tmp_path / "unet.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"missing key 'conv_out\.bias'"):
        load_model(str(path), arch="tiny")


def test_shape_mismatch_names_key_and_shapes(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    path = tmp_path / "unet.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"'conv_in\.weight' has shape \[32, 4, 1, 1\]"):
        load_model(str(path), arch="tiny")


def test_weights_for_another_architecture(tmp_path, tiny_state):
    path = tmp_path / "unet.safetensors"
    save_file({"foo.weight": torch.zeros(1), **tiny_state}, str(path))
    with pytest.raises(WeightsError, match="unexpected key 'foo.weight'"):
        load_model(str(path), arch="tiny")


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model"):
        load_model(str(folder))


def test_missing_file_and_unknown_name():
    with pytest.raises(WeightsError, match="not found"):
        load_model("/nonexistent/unet.safetensors", arch="tiny")
    with pytest.raises(UnknownNameError, match="unknown model 'sd99'.*sd15"):
        load_model("sd99")


def test_random_named_models_are_marked_random():
    loaded = load_model("tiny")
    assert loaded.info.random_weights
    sample, timestep, context = loaded.example_inputs
    assert sample.shape == (1, 4, 16, 16) and timestep.shape == (1,)
    assert context.shape == (1, 16, 32)


def test_shapes_family_is_the_pixel_space_model_and_its_derivatives():
    from snapc.families import is_shapes_family

    assert all(is_shapes_family(n) for n in ("shapes", "shapes-small", "shapes-fast"))
    assert not any(is_shapes_family(n) for n in ("shapes-latent", "sd15", "tiny", "shapesx"))
