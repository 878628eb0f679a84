"""Decoder compression on CPU: pruning keeps the decoder runnable with the planned channel
counts and leaves the input alone, distillation lowers the loss, folders round-trip through
save/load (and plain diffusers at keep 1), and bad input is one error line with nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from typer.testing import CliRunner

from snapc.cli import app
from snapc.decoder import (
    DecoderDistillation,
    DecoderLoss,
    load_compressed_vae,
    load_vae,
    plan_pruning,
    prune_decoder,
    save_compressed,
)
from snapc.decoder.io import FORMAT
from snapc.decoder.latents import LatentFile, LatentsError, RandomLatents
from snapc.decoder.prune import decoder_resnets, module_layout, planned_width
from snapc.testing import one_error_line
from snapc.train import TrainOptions, train
from snapc.train.distributed import World

# An SD-structured autoencoder small enough for CPU: 3 resolutions, mid-block attention.
TINY = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32], "norm_num_groups": 4, "sample_size": 32}
CPU = World(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**TINY).eval()


@pytest.fixture(scope="module")
def vae_folder(vae: AutoencoderKL, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _z(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def test_planned_width() -> None:
    assert planned_width(32, 128, 0.5) == (32, 64)
    assert planned_width(32, 128, 0.25) == (32, 32)
    assert planned_width(8, 16, 0.25) == (4, 4)  # under one channel a group: groups go
    assert planned_width(4, 32, 1.0) == (4, 32)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_prune_has_planned_channels_and_runs(vae: AutoencoderKL, keep: float) -> None:
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    record = plan_pruning(vae, keep)
    pruned, applied = prune_decoder(vae, keep)
    assert applied == record and len(record.plans) == 2 + 3 * 2  # mid 2, 3 up blocks of 2
    resnets = decoder_resnets(pruned)
    for plan in record.plans:
        r = resnets[plan.name]
        assert (r.conv1.out_channels, r.norm2.num_channels, r.norm2.num_groups,
                r.conv2.in_channels) == (plan.width, plan.width, plan.groups, plan.width)
        assert plan.width < plan.width_before and len(plan.kept) == plan.width
    assert abs(record.channels_removed("inner") - (1 - keep)) < 1e-6
    assert _decode(pruned, _z()).shape == (2, 3, 32, 32)
    after = vae.state_dict()  # the input is not changed
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("keep, width_keep", [(1.0, 0.5), (0.5, 0.5), (0.25, 0.25)])
def test_width_pruning_has_planned_streams_and_runs(vae: AutoencoderKL, keep: float,
                                                    width_keep: float) -> None:
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    pruned, record = prune_decoder(vae, keep, width_keep)
    streams = {p.name: p for p in record.of_kind("stream")}
    # TINY: conv_in..mid and up block 0 share the 32-wide stream (identity shortcut), up
    # block 1 keeps it (32 -> 32), up block 2 narrows to 16 through its conv_shortcut.
    assert list(streams) == ["mid", "up_blocks.2"]
    mid, last = streams["mid"].width, streams["up_blocks.2"].width
    assert mid == round(32 * width_keep) and last == round(16 * width_keep)
    dec = pruned.decoder
    assert dec.conv_in.out_channels == mid and dec.mid_block.attentions[0].to_q.in_features == mid
    assert dec.mid_block.attentions[0].to_out[0].out_features == mid
    assert dec.up_blocks[0].upsamplers[0].channels == mid
    assert dec.up_blocks[2].resnets[0].conv_shortcut.in_channels == mid
    assert dec.up_blocks[2].resnets[0].conv_shortcut.out_channels == last
    assert dec.conv_norm_out.num_channels == last and dec.conv_out.in_channels == last
    inner = record.of_kind("inner")[0]
    assert decoder_resnets(pruned)[inner.name].conv1.out_channels == inner.width
    assert _decode(pruned, _z()).shape == (2, 3, 32, 32)
    assert set(record.stage_channels()) == {"mid_block", "up_blocks.0", "up_blocks.1",
                                            "up_blocks.2"}
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_width_pruning_keeps_the_teachers_kept_channels(vae: AutoencoderKL) -> None:
    """The pruned conv_in holds the original's filters of the kept stream channels, the
    upsampler conv the kept rows and columns."""
    pruned, record = prune_decoder(vae, 1.0, 0.5)
    kept = list(record.of_kind("stream")[0].kept)
    torch.testing.assert_close(pruned.decoder.conv_in.weight, vae.decoder.conv_in.weight[kept])
    up = pruned.decoder.up_blocks[0].upsamplers[0].conv.weight
    torch.testing.assert_close(up, vae.decoder.up_blocks[0].upsamplers[0].conv.weight[kept][
        :, kept])


def test_prune_keeps_highest_l1_filters(vae: AutoencoderKL) -> None:
    pruned, record = prune_decoder(vae, 0.5)
    plan = record.plans[0]
    original = decoder_resnets(vae)[plan.name].conv1.weight
    norms = original.abs().flatten(1).sum(1).view(plan.groups_before, -1)
    for g in range(plan.groups):  # in every group the kept filters are its top half by L1
        kept = [c - g * norms.shape[1] for c in plan.kept if c // norms.shape[1] == g]
        assert sorted(kept) == sorted(norms[g].topk(len(kept)).indices.tolist())
    torch.testing.assert_close(decoder_resnets(pruned)[plan.name].conv1.weight,
                               original[list(plan.kept)])


def test_keep_one_is_the_original(vae: AutoencoderKL) -> None:
    pruned, _ = prune_decoder(vae, 1.0)
    torch.testing.assert_close(_decode(pruned, _z()), _decode(vae, _z()))


@pytest.mark.parametrize("width_keep", [1.0, 0.5])
def test_distillation_lowers_the_loss(vae: AutoencoderKL, tmp_path: Path,
                                      width_keep: float) -> None:
    pruned, record = prune_decoder(vae, 0.25, width_keep)
    snapshot = {k: v.clone() for k, v in pruned.state_dict().items()}
    source = RandomLatents((4, 8, 8), 1.0, seed=0, device=torch.device("cpu"))
    method = DecoderDistillation(vae, pruned, record.to_json(), source, 4, DecoderLoss(),
                                 record.stage_channels())
    held_out = {"latents": _z(4, seed=99)}

    def loss() -> float:
        with torch.no_grad():
            return method.loss(method.student, held_out)[0].item()

    start = loss()
    options = TrainOptions(steps=25, batch=4, lr=2e-3, warmup=1, ema=0.0, device="cpu",
                           checkpoint_every=100, log_every=5)
    result = train(method, options, tmp_path / "ck", world=CPU)
    assert loss() < 0.7 * start, (start, loss())
    assert result.record["method"]["pruning"]["keep"] == 0.25
    trained = method.vae.state_dict()  # the student is a copy: the pruned input is unchanged
    assert all(torch.equal(snapshot[k], v) for k, v in pruned.state_dict().items())
    assert not torch.equal(trained["decoder.conv_out.weight"], snapshot["decoder.conv_out.weight"])
    assert torch.equal(trained["encoder.conv_in.weight"], snapshot["encoder.conv_in.weight"])


@pytest.mark.parametrize("width_keep", [1.0, 0.5])
def test_folder_round_trip(vae: AutoencoderKL, tmp_path: Path, width_keep: float) -> None:
    pruned, record = prune_decoder(vae, 0.5, width_keep)
    save_compressed(pruned, record, tmp_path, {"base": "test"}, {"steps": 0})
    meta = json.loads((tmp_path / "snapc_decoder.json").read_text())
    assert meta["format"] == FORMAT and meta["layout"] == module_layout(pruned)
    loaded = load_compressed_vae(tmp_path)
    assert isinstance(loaded, AutoencoderKL)
    torch.testing.assert_close(_decode(loaded, _z()), _decode(pruned, _z()))
    again = load_vae(str(tmp_path)).vae
    assert module_layout(again) == module_layout(pruned)
    assert again.decoder.up_blocks[0].resnets[0].conv1.in_channels == round(32 * width_keep)


def test_keep_one_folder_loads_in_plain_diffusers(vae: AutoencoderKL, tmp_path: Path) -> None:
    pruned, record = prune_decoder(vae, 1.0)
    save_compressed(pruned, record, tmp_path, {}, None)
    plain = AutoencoderKL.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_decode(plain, _z()), _decode(vae, _z()))


def test_corrupt_weights_are_one_line(vae: AutoencoderKL, tmp_path: Path) -> None:
    pruned, record = prune_decoder(vae, 0.5)
    save_compressed(pruned, record, tmp_path, {}, None)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a file")
    result = CliRunner().invoke(app, ["compress-decoder", str(tmp_path), "-o",
                                      str(tmp_path / "x")])
    assert "re-run `snapc compress-decoder`" in one_error_line(result)


def test_latent_file_shape_is_checked(tmp_path: Path) -> None:
    save_file({"latents": torch.zeros(3, 8, 8, 8)}, str(tmp_path / "z.safetensors"))
    with pytest.raises(LatentsError, match="this decoder takes"):
        LatentFile(tmp_path / "z.safetensors", (4, 8, 8), 0, torch.device("cpu"))
    save_file({"latents": _z(3)}, str(tmp_path / "ok.safetensors"))
    pool = LatentFile(tmp_path / "ok.safetensors", (4, 8, 8), 0, torch.device("cpu"))
    assert pool.latents(0, 2, CPU).shape == (2, 4, 8, 8)


def test_command_distils_and_writes(vae_folder: Path, tmp_path: Path) -> None:
    save_file({"latents": _z(6)}, str(tmp_path / "z.safetensors"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "compress-decoder", str(vae_folder), "--keep", "0.5", "--width-keep", "0.5", "--steps", "3",
        "--batch", "2", "--warmup", "1", "--latents", str(tmp_path / "z.safetensors"),
        "--train-device", "cpu", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout[result.stdout.index("{"):])
    fig = record["figures"]
    assert fig["compressed"]["gmacs"] < fig["original"]["gmacs"]
    assert fig["compressed"]["params"] < fig["original"]["params"]
    assert set(fig["compressed"]["ms"]) == {"iphone14pro-ane", "adreno740"}
    assert record["training"]["steps"] == 3 and record["distilled"]
    assert json.loads((out / "training.json").read_text())["method"]["latents"]["source"] \
        == "file"
    assert not (tmp_path / "out.checkpoints").exists()
    load_compressed_vae(out)


@pytest.mark.parametrize("args, says", [
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--width-keep", "0"], "--width-keep must be in (0, 1]"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--latents", "missing.safetensors"], "latents file missing.safetensors not found"),
    (["--device", "nokia3310"], "unknown device"),
    (["--pixel-weight", "0", "--feature-weight", "0"], "not both 0"),
])
def test_bad_options_are_one_line(vae_folder: Path, tmp_path: Path, args: list[str],
                                  says: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress-decoder", str(vae_folder), "-o", str(out),
                                      *args])
    assert says in one_error_line(result)
    assert not out.exists()


def test_bad_model_and_existing_output(tmp_path: Path, vae_folder: Path) -> None:
    run = CliRunner().invoke
    assert "unknown autoencoder 'nope'" in one_error_line(
        run(app, ["compress-decoder", "nope", "-o", str(tmp_path / "o")]))
    assert "has no config.json" in one_error_line(
        run(app, ["compress-decoder", str(tmp_path), "-o", str(tmp_path / "o")]))
    (tmp_path / "exists").mkdir()
    assert "pass --force" in one_error_line(
        run(app, ["compress-decoder", str(vae_folder), "-o", str(tmp_path / "exists")]))

