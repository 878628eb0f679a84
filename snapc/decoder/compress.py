"""The whole ``snapc compress-decoder`` flow: load, prune, distil, measure, write.

Everything that can be wrong with the input (the model, the ratio, the latents file, the
output folder, the training options) is checked before pruning or training starts; the
output folder appears only when it is complete (:func:`snapc.artifacts.atomic_output_dir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snapc.artifacts import atomic_output_dir, check_output_dir
from snapc.decoder.distill import DecoderDistillation, DecoderLoss
from snapc.decoder.io import LoadedVae, load_vae, save_compressed
from snapc.decoder.latents import EncodedScenes, LatentFile, LatentSource, RandomLatents
from snapc.decoder.measure import decoder_figures
from snapc.decoder.prune import PruneRecord, _check_keep, prune_decoder
from snapc.errors import SnapcError
from snapc.train.distill import checkpoint_folder
from snapc.train.distributed import World, setup_world, teardown_world
from snapc.train.options import TrainOptions

__all__ = ["CompressOptions", "compress_decoder"]


@dataclass(frozen=True)
class CompressOptions:
    """What to compress and where: model, ResNet channel keep ratio, latents, output."""

    model: str
    out: Path
    keep: float = 0.5
    width_keep: float = 1.0
    latents: Path | None = None
    devices: tuple[str, ...] = ("iphone14pro-ane", "adreno740")
    force: bool = False
    resume: bool = False

    def check(self) -> None:
        """Raise SnapcError for a bad ratio, latents file, device or output folder."""
        from snapc.cost import load_device

        _check_keep(self.keep, self.width_keep)
        if self.latents is not None and not self.latents.is_file():
            raise SnapcError(f"latents file {self.latents} not found; pass a .safetensors "
                             "with 'latents' (N, C, h, w) or leave --latents out")
        for device in self.devices:
            load_device(device)
        if not self.resume:
            check_output_dir(self.out, self.force)


def _source(options: CompressOptions, loaded: LoadedVae, seed: int,
            device: torch.device) -> LatentSource:
    channels = loaded.vae.config.latent_channels
    shape = (channels, *loaded.latent_hw)
    if options.latents is not None:
        return LatentFile(options.latents, shape, seed, device)
    if loaded.name == "shapes-latent":
        return EncodedScenes(loaded.vae, seed, device)
    return RandomLatents(shape, float(loaded.vae.config.scaling_factor), seed, device)


def _distil(options: CompressOptions, train_options: TrainOptions, loss: DecoderLoss,
            loaded: LoadedVae, pruned: torch.nn.Module, record: PruneRecord, world: World,
            progress: Callable | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    from snapc.train.checkpoint import latest_checkpoint
    from snapc.train.loop import train

    torch.manual_seed(train_options.seed)
    source = _source(options, loaded, train_options.seed, world.device)
    method = DecoderDistillation(loaded.vae, pruned, record.to_json(), source,
                                 train_options.batch, loss, record.stage_channels())
    folder = checkpoint_folder(options.out)
    result = train(method, train_options, folder, world=world,
                   resume=options.resume and latest_checkpoint(folder) is not None,
                   progress=None if progress is None else
                   (lambda p: progress("distil decoder", p)))
    return method.vae.cpu().eval().requires_grad_(False), result.record


def _figures(loaded: LoadedVae, pruned: torch.nn.Module,
             devices: tuple[str, ...]) -> dict[str, Any]:
    figures = {"original": decoder_figures(loaded.vae, loaded.latent_hw, devices),
               "compressed": decoder_figures(pruned, loaded.latent_hw, devices)}
    figures["macs_ratio"] = round(figures["original"]["gmacs"]
                                  / figures["compressed"]["gmacs"], 3)
    figures["params_ratio"] = round(figures["original"]["params"]
                                    / figures["compressed"]["params"], 3)
    return figures


def compress_decoder(options: CompressOptions, train_options: TrainOptions | None,
                     loss: DecoderLoss, *, progress: Callable | None = None,
                     report: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Prune ``options.model``'s decoder, distil it when ``train_options`` is given (a run of
    snapc.train.loop's ``train``: checkpoints in ``<out>.checkpoints``, resume, torchrun),
    measure original and compressed, write the folder; return the record.

    Raises SnapcError (one line) for bad input, before any long work. Under torchrun only
    rank 0 measures and writes (the others return an empty record).
    """
    import shutil

    options.check()
    if train_options is not None:
        train_options.check()
    loss.check()
    started = time.perf_counter()
    world = setup_world(train_options.device if train_options is not None else "cpu")
    try:
        loaded = load_vae(options.model)
        pruned, record = prune_decoder(loaded.vae, options.keep, options.width_keep)
        report(f"pruned the decoder: {record.channels_removed('inner'):.0%} of ResNet inner "
               f"channels, {record.channels_removed('stream'):.0%} of block widths removed "
               f"({record.criterion})")
        training = None
        if train_options is not None:
            pruned, training = _distil(options, train_options, loss, loaded, pruned, record,
                                       world, progress)
        if not world.main:
            world.barrier()
            return {}
        report("measuring original and compressed decoders")
        loaded.vae.cpu()
        extra = {"base": loaded.name, "random_weights": loaded.random_weights,
                 "distilled": training is not None,
                 "figures": _figures(loaded, pruned, options.devices)}
        with atomic_output_dir(options.out, force=options.force or options.resume) as tmp:
            save_compressed(pruned, record, tmp, extra, training)
        shutil.rmtree(checkpoint_folder(options.out), ignore_errors=True)
        world.barrier()
    finally:
        teardown_world(world)
    return {"output": str(options.out), **extra, "keep": options.keep,
            "width_keep": options.width_keep,
            "channels_removed": round(record.channels_removed("inner"), 4),
            "width_removed": round(record.channels_removed("stream"), 4),
            "seconds": round(time.perf_counter() - started, 1), "training": training,
            "steps": training["steps"] if training else 0}
