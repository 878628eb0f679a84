"""Compare a candidate's output with a reference: PSNR, max abs error, cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["Numerics", "compare", "verify", "PSNR_CAP_DB"]

# PSNR of identical outputs is infinite; it is reported as this cap so JSON stays standard.
PSNR_CAP_DB = 200.0


@dataclass(frozen=True)
class Numerics:
    """How close a candidate output is to the reference output."""

    psnr_db: float
    max_abs: float
    mean_abs: float
    cosine: float

    def to_json(self) -> dict[str, float]:
        """Return a JSON-ready dict."""
        return {k: float(v) for k, v in asdict(self).items()}

    def passes(self, min_psnr_db: float) -> bool:
        """Return True when PSNR reaches ``min_psnr_db`` and the output is finite."""
        return math.isfinite(self.max_abs) and self.psnr_db >= min_psnr_db


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def compare(reference: object, candidate: object) -> Numerics:
    """Return Numerics of ``candidate`` against ``reference`` (tensors or arrays, same shape).

    PSNR uses the reference's peak magnitude: 20*log10(max|ref| / rmse), capped at PSNR_CAP_DB.
    """
    ref, out = _as_array(reference), _as_array(candidate)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    if not np.isfinite(out).all():
        return Numerics(psnr_db=-math.inf, max_abs=math.inf, mean_abs=math.inf, cosine=0.0)
    diff = out - ref
    rmse = float(np.sqrt(np.mean(diff**2)))
    peak = float(np.max(np.abs(ref))) or 1.0
    psnr = PSNR_CAP_DB if rmse == 0 else min(PSNR_CAP_DB, 20 * math.log10(peak / rmse))
    norm = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(np.sum(ref * out) / norm) if norm else 1.0
    return Numerics(psnr_db=psnr, max_abs=float(np.max(np.abs(diff))),
                    mean_abs=float(np.mean(np.abs(diff))), cosine=cosine)


def _callable(model: object) -> Callable[..., object]:
    from snapc.graph import Graph

    if isinstance(model, Graph):
        return model.module()
    if callable(model):
        return model
    raise TypeError(f"cannot run {type(model).__name__}: pass a Graph, module or callable")


def _output(model: object, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return ``model``'s output on ``inputs``; a Graph fed its own example inputs returns its
    cached ``example_output`` instead of running again."""
    from snapc.graph import Graph

    if isinstance(model, Graph) and len(inputs) == len(model.example_inputs) and all(
            a is b for a, b in zip(inputs, model.example_inputs, strict=True)):
        return model.example_output
    with torch.no_grad():
        out = _callable(model)(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def verify(reference: object, candidate: object, inputs: Sequence[torch.Tensor]) -> Numerics:
    """Run ``reference`` and ``candidate`` (Graphs, modules or callables) on ``inputs`` and
    return the candidate's Numerics against the reference."""
    return compare(_output(reference, inputs), _output(candidate, inputs))
