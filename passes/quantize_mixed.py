"""Mixed precision by sensitivity: per-layer bit widths that meet a size budget or PSNR floor.

Each layer is quantized alone with each candidate scheme and the UNet output is compared with
the fp32 output on the calibration set (PSNR). Quantization noise of different layers adds up
roughly independently, so the PSNR of a combination is estimated from the per-layer noise powers
``10**(-psnr/10)``. Starting from all-``w8``, a greedy loop lowers the layer whose next scheme
saves the most bytes per unit of added noise, until the size budget is met (``size_mb``) or the
next step would fall below the PSNR floor (``psnr_floor_db``), as Apple's mixed-bit
palettization does. The chosen combination is then measured, not only estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from snapc.errors import BudgetError, SnapcError
from snapc.numerics import compare
from snapc.passes.quantize_schemes import dequantize, make_record, record_bytes

__all__ = ["CANDIDATES", "layer_sensitivity", "choose_schemes", "measure_psnr"]

CANDIDATES = ("w8", "palette6", "palette4")  # from most to fewest bits


def _param(gm: fx.GraphModule, key: str, root: str) -> torch.Tensor:
    owner, _, name = f"{root}.{key}".rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _swap(gm: fx.GraphModule, key: str, root: str, value: torch.Tensor) -> torch.Tensor:
    """Bind a new parameter object at ``key`` (never writes into the old one, which the
    graph's program shares) and return the old one."""
    owner, _, name = f"{root}.{key}".rpartition(".")
    module = gm.get_submodule(owner)
    old = getattr(module, name)
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    return old


def _outputs(gm: fx.GraphModule, chunks: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(*chunk) for chunk in chunks])


def measure_psnr(gm: fx.GraphModule, chunks: Sequence[tuple[torch.Tensor, ...]],
                 reference: torch.Tensor, records: dict[str, dict[str, Any]], root: str = "net"
                 ) -> float:
    """Return the PSNR (dB) of ``gm`` with ``records`` applied to its weights vs ``reference``.

    New parameter objects are bound for the measurement and the old ones put back before
    returning; no weight tensor is written to.
    """
    saved = {}
    try:
        for key, record in records.items():
            weight = _param(gm, key, root)
            saved[key] = _swap(gm, key, root, dequantize(weight.data, record))
        return compare(reference, _outputs(gm, chunks)).psnr_db
    finally:
        for key, weight in saved.items():
            owner, _, name = f"{root}.{key}".rpartition(".")
            setattr(gm.get_submodule(owner), name, weight)


def layer_sensitivity(gm: fx.GraphModule, chunks: Sequence[tuple[torch.Tensor, ...]],
                      keys: Sequence[str], candidates: Sequence[str] = CANDIDATES,
                      root: str = "net", seed: int = 0, progress: Any = None
                      ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, float]]]:
    """Return (records, psnr): per layer and candidate scheme, its record and the PSNR of the
    output when only that layer is quantized with it."""
    reference = _outputs(gm, chunks)
    records: dict[str, dict[str, dict[str, Any]]] = {}
    psnr: dict[str, dict[str, float]] = {}
    for i, key in enumerate(keys):
        weight = _param(gm, key, root).data
        records[key] = {s: make_record(weight, s, seed=seed) for s in candidates}
        psnr[key] = {s: measure_psnr(gm, chunks, reference, {key: r}, root)
                     for s, r in records[key].items()}
        if progress:
            progress(i + 1, len(keys))
    return records, psnr


def _noise(psnr_db: float) -> float:
    return 10 ** (-min(psnr_db, 150.0) / 10)


def choose_schemes(psnr: dict[str, dict[str, float]], sizes: dict[str, dict[str, int]],
                   other_bytes: int, size_mb: float | None = None,
                   psnr_floor_db: float | None = None) -> dict[str, str]:
    """Return {layer: scheme} meeting ``size_mb`` (artifact megabytes, 1e6 bytes) or keeping the
    estimated PSNR above ``psnr_floor_db``; ``other_bytes`` are the bytes of unquantized
    parameters. Raises BudgetError when the budget cannot be met."""
    if (size_mb is None) == (psnr_floor_db is None):
        raise SnapcError("mixed precision needs exactly one of a size budget (--size-mb) "
                         "or a PSNR floor")
    order = {key: [s for s in CANDIDATES if s in psnr[key]] for key in psnr}
    choice = {key: 0 for key in psnr}
    total = other_bytes + sum(sizes[k][order[k][0]] for k in psnr)
    noise = sum(_noise(psnr[k][order[k][0]]) for k in psnr)
    budget = None if size_mb is None else size_mb * 1e6
    while budget is None or total > budget:
        best, best_gain = None, -1.0
        for key, i in choice.items():
            if i + 1 >= len(order[key]):
                continue
            cur, nxt = order[key][i], order[key][i + 1]
            saved = sizes[key][cur] - sizes[key][nxt]
            added = max(_noise(psnr[key][nxt]) - _noise(psnr[key][cur]), 1e-30)
            if saved / added > best_gain:
                best, best_gain = key, saved / added
        if best is None:
            if budget is None:
                break
            raise BudgetError(f"mixed precision cannot reach {size_mb} MB (smallest is "
                              f"{total / 1e6:.1f} MB); raise --size-mb")
        cur, nxt = order[best][choice[best]], order[best][choice[best] + 1]
        new_noise = noise - _noise(psnr[best][cur]) + _noise(psnr[best][nxt])
        if psnr_floor_db is not None and -10 * math.log10(new_noise) < psnr_floor_db:
            break
        choice[best] += 1
        total += sizes[best][nxt] - sizes[best][cur]
        noise = new_noise
    return {key: order[key][i] for key, i in choice.items()}


def candidate_sizes(gm: fx.GraphModule, records: dict[str, dict[str, dict[str, Any]]],
                    root: str = "net") -> dict[str, dict[str, int]]:
    """Return {layer: {scheme: stored bytes}} for the candidate records."""
    return {key: {s: record_bytes(_param(gm, key, root), r) for s, r in recs.items()}
            for key, recs in records.items()}
