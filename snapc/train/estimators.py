"""Estimators of a removed set's quality after full recovery, and how well they rank sets.

An estimator maps what is known of a removed set before its full recovery (its structure, its
quality as removed, a short recovery probe from snapc.train.screening.recovery_probe) to one
number, with the GPU seconds it costs per candidate and its direction. :func:`rank_agreement`
says how well an estimator orders sets as the full recovery does: Spearman's rho over all
sets and within each budget (what a search compares), concordant pairs and top-1 hits within
budgets.

Probe estimator names are ``<measure>[_<part>][_<weights>]@<point>``: ``adherence_ema@30s``,
``heldout_output_kd_raw@30s``, ``adherence@0s`` (the start, as removed), and, from the probe
up to a point, ``train_loss@30s`` (training loss over the last fifth of the steps),
``train_slope@30s`` (d loss / d ln step over the second half), ``train_extrap@30s`` and
``heldout[_output_kd]_extrap_<weights>@30s`` (``a + b * step^-c`` fitted to the points up to
there, evaluated at the full recovery's steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

__all__ = ["Estimate", "Agreement", "HIGHER_IS_BETTER", "set_structure", "structure_estimates",
           "probe_estimates", "power_law_at", "rank_correlation", "concordant_pairs",
           "rank_agreement"]

# Measures where a higher value predicts a better set; every other one is a loss.
HIGHER_IS_BETTER = frozenset({"adherence", "params_kept", "attentions_kept", "resnets_kept",
                              "adherence_before", "latency_ms"})
_EXTRAPOLATED_PARTS = ("loss", "output_kd")


@dataclass(frozen=True)
class Estimate:
    """One estimator's value for one set: None where it could not be computed (too few
    points for a fit); ``cost_s`` the GPU seconds per candidate (None: known from elsewhere)."""

    value: float | None
    cost_s: float | None
    higher_is_better: bool


def set_structure(full: nn.Module, pruned: nn.Module, removed: Iterable[str]) -> dict[str, float]:
    """Return what a removed set keeps: parameter fraction, attention and ResNet blocks kept,
    and blocks removed (``full`` the original UNet, ``pruned`` it without ``removed``)."""
    from snapc.pruned import removable_blocks

    removed = set(removed)
    names = removable_blocks(full)
    kept = [n for n in names if n not in removed]
    return {"params_kept": sum(p.numel() for p in pruned.parameters())
            / sum(p.numel() for p in full.parameters()),
            "attentions_kept": float(sum(".attentions." in n for n in kept)),
            "resnets_kept": float(sum(".resnets." in n for n in kept)),
            "blocks_removed": float(len(removed))}


def structure_estimates(values: Mapping[str, float]) -> dict[str, Estimate]:
    """Return zero-cost estimates from a set's structure or its recorded row (as-removed
    adherence ``adherence_before``, predicted ``latency_ms``): ``cost_s`` 0, or None for a
    measured one (``adherence_before``: the full metric as removed)."""
    return {k: Estimate(float(v), None if k == "adherence_before" else 0.0,
                        k in HIGHER_IS_BETTER) for k, v in values.items()}


def power_law_at(steps: Sequence[float], losses: Sequence[float], horizon: float) -> float | None:
    """Return ``a + b * horizon^-c`` fitted to (steps, losses) by least squares (scipy), with
    a, b >= 0 and 0 < c <= 3; None with fewer than 3 points or when the fit fails."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if len(x) < 3 or not (np.all(x > 0) and np.all(np.isfinite(y))):
        return None
    scale = float(x.max())  # fit in x / scale: b stays of the order of the losses

    def law(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a + b * np.power(s, -c)

    floor = 0.9 * float(y.min())
    p0 = (floor, max(float(y[np.argmin(x)]) - floor, 1e-6) * float(x.min() / scale) ** 0.5, 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, _ = curve_fit(law, x / scale, y, p0=p0, bounds=([0, 0, 1e-3], [np.inf] * 2 + [3]),
                                maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    value = float(law(np.asarray(horizon / scale), *popt))
    return value if math.isfinite(value) else None


def _points_label(point: Mapping[str, Any], by: str) -> str:
    return f"{point['at']:g}{'s' if by == 'seconds' else 'steps'}"


def _measured(point: Mapping[str, Any]) -> Iterable[tuple[str, str, float, float]]:
    """Yield (weights, name, value, seconds) for each measured number of a probe point."""
    for weights, measures in point["measures"].items():
        for measure, m in measures.items():
            parts = m["value"] if isinstance(m["value"], dict) else {"loss": m["value"]}
            for part, value in parts.items():
                name = measure if part == "loss" else f"{measure}_{part}"
                yield weights, name, float(value), float(m["seconds"])


def _slope(steps: Sequence[float], losses: Sequence[float]) -> float | None:
    if len(steps) < 3:
        return None
    return float(np.polyfit(np.log(np.asarray(steps, dtype=float)), losses, 1)[0])


def _train_estimates(history: Sequence[Mapping[str, float]], step: int, label: str,
                     cost: float, horizon: float | None) -> dict[str, Estimate]:
    seen = [h for h in history if 0 < h["step"] <= step]
    if not seen:
        return {}
    last = [h["loss"] for h in seen if h["step"] > 0.8 * step] or [seen[-1]["loss"]]
    half = [h for h in seen if h["step"] >= step / 2]
    tail = [h for h in seen if h["step"] >= step / 4]
    out = {f"train_loss@{label}": Estimate(float(np.mean(last)), cost, False),
           f"train_slope@{label}": Estimate(_slope([h["step"] for h in half],
                                                   [h["loss"] for h in half]), cost, False)}
    if horizon is not None:
        fit = (power_law_at([h["step"] for h in tail], [h["loss"] for h in tail], horizon)
               if len(tail) >= 4 else None)
        out[f"train_extrap@{label}"] = Estimate(fit, cost, False)
    return out


def probe_estimates(probe: Mapping[str, Any], horizon_steps: float | None) -> dict[str, Estimate]:
    """Return every estimator a probe (``RecoveryProbe.to_json()``) yields.

    Costs: the training seconds to the point plus the measurement's own seconds (the held-out
    fits: plus every held-out measurement they use). ``horizon_steps`` (the full recovery's
    steps) is where fits are evaluated; None leaves the fits out.
    """
    by, points = probe["by"], probe["points"]
    out: dict[str, Estimate] = {}
    heldout_cost: dict[str, float] = {}
    for k, point in enumerate(points):
        label, train_s = _points_label(point, by), float(point["train_seconds"])
        for weights, name, value, seconds in _measured(point):
            suffix = "" if weights == "start" else f"_{weights}"
            out[f"{name}{suffix}@{label}"] = Estimate(value, train_s + seconds,
                                                      name in HIGHER_IS_BETTER)
        if k == 0:
            continue
        out |= _train_estimates(probe["history"], int(point["step"]), label, train_s,
                                horizon_steps)
        if horizon_steps is None:
            continue
        for weights, measures in point["measures"].items():
            if "heldout" not in measures:
                continue
            heldout_cost[weights] = heldout_cost.get(weights, 0.0) + \
                float(measures["heldout"]["seconds"])
            used = [p for p in points[1:k + 1] if "heldout" in p["measures"].get(weights, {})]
            for part in _EXTRAPOLATED_PARTS:
                fit = power_law_at([p["step"] for p in used],
                                   [p["measures"][weights]["heldout"]["value"][part]
                                    for p in used], horizon_steps)
                name = "heldout" if part == "loss" else f"heldout_{part}"
                out[f"{name}_extrap_{weights}@{label}"] = Estimate(
                    fit, train_s + heldout_cost[weights], False)
    return out


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Return Spearman's rho of two sequences (scipy.stats.spearmanr, ties averaged); NaN
    with fewer than 3 pairs or a constant sequence."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"rank_correlation needs sequences of one length, not {len(a)} "
                         f"and {len(b)}")
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def concordant_pairs(predicted: Sequence[float], actual: Sequence[float]) -> tuple[float, int]:
    """Return (pairs ordered as ``actual`` orders them, pairs): a tie in either counts half."""
    good, pairs = 0.0, 0
    for i in range(len(actual)):
        for j in range(i + 1, len(actual)):
            pairs += 1
            sign = (predicted[i] - predicted[j]) * (actual[i] - actual[j])
            good += 1.0 if sign > 0 else 0.5 if sign == 0 else 0.0
    return good, pairs


@dataclass(frozen=True)
class Agreement:
    """How well one estimator orders sets as their quality after full recovery does.

    ``rho_all``: Spearman's rho over all sets with a value (``n``); ``rho_within``: per budget
    with 3 such sets or more (``n_within``: sets with a value per budget); ``mean_within``:
    their mean; ``pairs_within``: (concordant, pairs)
    summed over budgets; ``top1_within``: (budgets whose best predicted set is the best
    recovered, budgets with 2 sets or more). Values are oriented: positive rho is right.
    """

    rho_all: float
    n: int
    rho_within: dict[Hashable, float]
    n_within: dict[Hashable, int]
    mean_within: float
    pairs_within: tuple[float, int]
    top1_within: tuple[int, int]


def rank_agreement(values: Sequence[float | None], targets: Sequence[float],
                   groups: Sequence[Hashable], higher_is_better: bool) -> Agreement:
    """Return how well ``values`` (None: missing) order ``targets`` overall and per group."""
    sign = 1.0 if higher_is_better else -1.0
    known = [(sign * v, t, g) for v, t, g in zip(values, targets, groups, strict=True)
             if v is not None and math.isfinite(v)]
    rho_within: dict[Hashable, float] = {}
    n_within: dict[Hashable, int] = {}
    good, pairs, hits, budgets = 0.0, 0, 0, 0
    for group in dict.fromkeys(g for _, _, g in known):
        mine = [(v, t) for v, t, g in known if g == group]
        n_within[group] = len(mine)
        if len(mine) >= 3:
            rho_within[group] = rank_correlation([v for v, _ in mine], [t for _, t in mine])
        if len(mine) >= 2:
            g_good, g_pairs = concordant_pairs([v for v, _ in mine], [t for _, t in mine])
            good, pairs = good + g_good, pairs + g_pairs
            budgets += 1
            top = max(v for v, _ in mine)  # a tie for the top counts its worst set
            hits += int(min(t for v, t in mine if v == top) == max(t for _, t in mine))
    finite = [r for r in rho_within.values() if math.isfinite(r)]
    return Agreement(rank_correlation([v for v, _, _ in known], [t for _, t, _ in known]),
                     len(known), rho_within, n_within,
                     float(np.mean(finite)) if finite else math.nan, (good, pairs), (hits, budgets))
