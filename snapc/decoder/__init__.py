"""Decoder compression: structured channel pruning of an AutoencoderKL decoder (prune), data
distillation from the original (distill, latents), figures (measure), folders (io), and the
``snapc compress-decoder`` flow (compress)."""

from snapc.decoder.compress import CompressOptions, compress_decoder
from snapc.decoder.distill import DecoderDistillation, DecoderLoss
from snapc.decoder.io import load_compressed_vae, load_vae, save_compressed
from snapc.decoder.measure import decoder_figures
from snapc.decoder.prune import PruneRecord, apply_layout, plan_pruning, prune_decoder

__all__ = [
    "CompressOptions",
    "DecoderDistillation",
    "DecoderLoss",
    "PruneRecord",
    "apply_layout",
    "compress_decoder",
    "decoder_figures",
    "load_compressed_vae",
    "load_vae",
    "plan_pruning",
    "prune_decoder",
    "save_compressed",
]
