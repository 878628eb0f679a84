"""Weight quantization schemes: the parameters of each scheme and its quantize-dequantize.

A *record* describes how one weight (``down_blocks.0.resnets.0.conv1.weight``) is stored::

    w8        int8, symmetric, one scale per output channel (axis 0):
              s_c = max|w_c| / 127,   q = clamp(round(w / s_c), -127, 127),   w' = q * s_c
    w4        int4, symmetric, one scale per group of ``group_size`` input channels (axis 1)
              at each other index:    s_g = max|w_g| / 7, q in [-7, 7]
    palette6  k-means look-up table of 2**6 values per tensor: q = index of the nearest
    palette4  entry, w' = lut[q]
    fp16      w' = fp16(w)
    fp32      kept as is (an fp32 island of the fp16 scheme)
    w8a8      int8 weights in [-63, 63] (see make_record) plus static uint8 activation
              scales (see quantize_observers)

Records hold only the parameters (scales, look-up tables); the integer codes are a deterministic
function of the weight and the parameters (:func:`weight_codes`), so they are never stored twice.
Every function here is pure and returns new tensors.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WEIGHT_SCHEMES", "BITS", "make_record", "dequantize", "weight_codes",
           "kmeans_lut", "symmetric_scales", "group_scales", "record_bytes"]

WEIGHT_SCHEMES = ("fp16", "w8", "w4", "w8a8", "palette6", "palette4")
BITS = {"fp32": 32, "fp16": 16, "w8": 8, "w8a8": 8, "w4": 4, "palette8": 8, "palette6": 6,
        "palette4": 4, "palette2": 2}
_KMEANS_SAMPLE = 1 << 20  # values the look-up table is fitted on (all values are assigned)


def symmetric_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Return one symmetric scale per output channel (axis 0) of ``w``: max|w_c| / (2^(b-1)-1).

    An all-zero channel gets scale 1 so dequantization stays exact (q = 0).
    """
    peak = w.detach().float().abs().reshape(w.shape[0], -1).amax(dim=1)
    return torch.where(peak > 0, peak / (2 ** (bits - 1) - 1), torch.ones_like(peak))


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return ``w`` (O, I, ...) as (O, G, group_size, ...) with I zero-padded to G*group_size."""
    pad = (-w.shape[1]) % group_size
    if pad:
        w = torch.cat([w, w.new_zeros((w.shape[0], pad, *w.shape[2:]))], dim=1)
    return w.reshape(w.shape[0], -1, group_size, *w.shape[2:])


def group_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Return symmetric scales of shape (O, ceil(I/group_size), ...) for groups along axis 1.

    This is ONNX's blocked quantization layout (DequantizeLinear ``axis=1, block_size``).
    """
    peak = _grouped(w.detach().float(), group_size).abs().amax(dim=2)
    return torch.where(peak > 0, peak / (2 ** (bits - 1) - 1), torch.ones_like(peak))


def kmeans_lut(w: torch.Tensor, bits: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """Return a sorted look-up table of 2**bits values fitted to ``w`` by 1-d k-means (Lloyd).

    Hand-written rather than scikit-learn: in one dimension the nearest centre is a
    ``torch.bucketize`` against the midpoints of the sorted table, so a few Lloyd iterations on
    tens of millions of values take seconds without a new dependency. The table is fitted on a
    seeded sample of at most 2**20 values, initialised at the sample's quantiles.
    """
    values = w.detach().float().reshape(-1)
    if values.numel() > _KMEANS_SAMPLE:
        gen = torch.Generator().manual_seed(seed)
        values = values[torch.randint(values.numel(), (_KMEANS_SAMPLE,), generator=gen)]
    k = 2**bits
    distinct = values.unique()  # sorted
    if distinct.numel() <= k:  # already palettized: the table is its values, padded
        return torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
    values, _ = values.sort()
    lut = values[torch.linspace(0, values.numel() - 1, k).round().long()].unique()
    lut = torch.cat([lut, distinct[torch.randperm(distinct.numel())[: k - lut.numel()]]]).sort()[0]
    for _ in range(iters):
        index = _nearest(values, lut)
        sums = torch.zeros(k).index_add_(0, index, values)
        counts = torch.bincount(index, minlength=k).float()
        lut = torch.where(counts > 0, sums / counts.clamp(min=1), lut).sort().values
    return lut


def _nearest(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Return the index of the nearest entry of the sorted ``lut`` for each value."""
    return torch.bucketize(values, (lut[1:] + lut[:-1]) / 2)


def make_record(w: torch.Tensor, scheme: str, group_size: int = 32, seed: int = 0
                ) -> dict[str, Any]:
    """Return the record (scheme and parameters) that stores ``w`` with ``scheme``."""
    if scheme == "w8":
        return {"scheme": scheme, "bits": 8, "axis": 0, "qmax": 127,
                "scale": symmetric_scales(w, 8)}
    if scheme == "w8a8":
        # codes in [-63, 63] (onnxruntime's reduce_range): on x86 without VNNI, the u8 x s8
        # kernels add pairs of products in int16 (VPMADDUBSW), which saturates at full range
        return {"scheme": scheme, "bits": 8, "axis": 0, "qmax": 63,
                "scale": symmetric_scales(w, 7)}
    if scheme == "w4":
        return {"scheme": "w4", "bits": 4, "axis": 1, "group_size": group_size,
                "scale": group_scales(w, 4, group_size)}
    if scheme.startswith("palette"):
        bits = int(scheme.removeprefix("palette"))
        return {"scheme": scheme, "bits": bits, "lut": kmeans_lut(w, bits, seed=seed)}
    if scheme in ("fp16", "fp32"):
        return {"scheme": scheme, "bits": BITS[scheme]}
    raise ValueError(f"unknown weight scheme '{scheme}'; use one of {', '.join(WEIGHT_SCHEMES)}")


def weight_codes(w: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
    """Return the integer codes of ``w`` under ``record`` (int8 for w8/w4, uint8 indices for
    palettes), in ``w``'s layout (w4 codes are not padded)."""
    scheme, w = record["scheme"], w.detach().float()
    if scheme in ("w8", "w8a8"):
        scale = record["scale"].reshape(-1, *([1] * (w.dim() - 1)))
        qmax = record.get("qmax", 127)
        return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8)
    if scheme == "w4":
        g = record["group_size"]
        scale = record["scale"].unsqueeze(2)
        q = torch.clamp(torch.round(_grouped(w, g) / scale), -7, 7).to(torch.int8)
        return q.reshape(w.shape[0], -1, *w.shape[2:])[:, : w.shape[1]]
    if scheme.startswith("palette"):
        return _nearest(w.reshape(-1), record["lut"]).reshape(w.shape).to(torch.uint8)
    raise ValueError(f"scheme '{scheme}' has no integer codes")


def dequantize(w: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
    """Return ``w`` quantized and dequantized under ``record`` (fp32, ``w``'s shape)."""
    scheme, w = record["scheme"], w.detach().float()
    if scheme == "fp32":
        return w.clone()
    if scheme == "fp16":
        return w.half().float()
    q = weight_codes(w, record)
    if scheme.startswith("palette"):
        return record["lut"][q.long()]
    if scheme == "w4":
        g = record["group_size"]
        deq = _grouped(q.float(), g) * record["scale"].unsqueeze(2)
        return deq.reshape(w.shape[0], -1, *w.shape[2:])[:, : w.shape[1]].contiguous()
    return q.float() * record["scale"].reshape(-1, *([1] * (w.dim() - 1)))


def record_bytes(w: torch.Tensor, record: dict[str, Any]) -> int:
    """Return the bytes ``w`` takes when stored under ``record``: packed codes plus fp32
    parameters (scales, look-up table)."""
    n = w.numel()
    params = sum(int(v.numel()) * 4 for v in record.values() if isinstance(v, torch.Tensor))
    return (n * BITS[record["scheme"]] + 7) // 8 + params
