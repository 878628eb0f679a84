"""Fit a device's per-class efficiencies and launch overhead to a measured latency table.

With ``x_c = 1 / efficiency_c`` the model of a block is linear in the unknowns::

    t_block = sum_c x_c * R_c(block) + sum_g y_g * S_g(block) + L * launches(block)
              + V * views(block)

where ``R_c`` is the summed roofline time (max of compute and memory time at 100%) of the
block's class-``c`` nodes, ``S_g = sum R(node) * ROWS_REF / M(node)`` the same for the GEMM
classes (conv, matmul) weighted by how small each node's GEMM is (``M`` rows; efficiency
falls as ``M / (M + m_g)`` with ``m_g = y_g * ROWS_REF / x_g``), ``L`` the per-kernel
overhead and ``V`` the dispatch cost of a view op (0 on devices that compile views away).
The fit minimises the relative residuals ``(model - measured) / measured`` (so small blocks
count as much as large ones) with non-negative unknowns (``scipy.optimize.lsq_linear``), plus
a weak pull towards the profile's priors so that classes the table does not exercise keep
their prior.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from snapc.cost.device import DeviceProfile
from snapc.cost.roofline import roofline
from snapc.cost.table import LatencyTable, TableError
from snapc.cost.work import CONV, MATMUL, OP_CLASSES, VIEW, NodeWork, dtype_key

__all__ = ["fit", "features"]

PRIOR_WEIGHT = 1e-4  # weight of each prior row relative to one measured block (weak pull)
_MAX_EFFICIENCY = 100.0
GEMM_CLASSES = (CONV, MATMUL)  # classes whose efficiency depends on the GEMM size M
ROWS_REF = 1024.0  # scale of the size features (keeps the unknowns of similar magnitude)


def features(work: Iterable[NodeWork], device: DeviceProfile, dtype: str) -> np.ndarray:
    """Return ``[R_conv, R_matmul, R_attention, R_norm, R_elementwise, S_conv, S_matmul,
    launches, views]`` (roofline seconds per class, the size-weighted GEMM times, then the
    kernel and view counts) for the nodes in ``work``."""
    classes = len(OP_CLASSES)
    row = np.zeros(classes + len(GEMM_CLASSES) + 2)
    for item in work:
        line = roofline(item, device, dtype)
        if line is None:
            continue
        if line.op_class == VIEW:
            row[-1] += 1
            continue
        row[OP_CLASSES.index(line.op_class)] += line.base_s
        if line.op_class in GEMM_CLASSES and item.rows:
            row[classes + GEMM_CLASSES.index(line.op_class)] += line.base_s * ROWS_REF / item.rows
        row[-2] += line.launches
    return row


def fit(device: DeviceProfile, table: LatencyTable,
        names: Iterable[str] | None = None) -> DeviceProfile:
    """Return ``device`` with efficiencies and launch overhead fitted to ``table``'s blocks
    (only the blocks in ``names`` when given). ``device`` itself is not changed.

    Raises TableError when no block entry carries node work to fit against.
    """
    wanted = set(names) if names is not None else None
    entries = [b for b in table.blocks if b.work and (wanted is None or b.name in wanted)]
    if not entries:
        raise TableError(f"table for '{table.model_name}' on {table.device} has no block "
                         "entries with node work to fit; re-run `snapc profile`")
    dtype = dtype_key(table.dtype)
    rows = np.array([features(b.work, device, dtype) for b in entries])
    measured = np.array([b.timing.median_ms * 1e-3 for b in entries])
    design = rows / measured[:, None]
    target = np.ones(len(entries))

    classes, gemms = len(OP_CLASSES), len(GEMM_CLASSES)
    class_prior = np.array([1.0 / device.efficiency[c] for c in OP_CLASSES])
    size_prior = np.array([device.small_gemm_rows.get(g, 0.0) / ROWS_REF
                           * class_prior[OP_CLASSES.index(g)] for g in GEMM_CLASSES])
    overhead_prior = np.array([max(device.launch_us, 1e-3) * 1e-6,
                               max(device.view_us, 1e-3) * 1e-6])
    # A weak pull of each unknown towards its prior, in units of that prior (the size terms
    # in units of their class's prior: pulled towards "no size effect" unless the profile
    # says otherwise).
    scale = np.concatenate([class_prior, [class_prior[OP_CLASSES.index(g)] for g in
                                          GEMM_CLASSES], overhead_prior])
    prior = np.concatenate([class_prior, size_prior, overhead_prior])
    weight = np.sqrt(PRIOR_WEIGHT)
    design = np.vstack([design, np.diag(weight / scale)])
    target = np.concatenate([target, weight * prior / scale])

    from scipy.optimize import lsq_linear

    lower = np.concatenate([np.full(classes, 1.0 / _MAX_EFFICIENCY), np.zeros(gemms + 2)])
    solution = lsq_linear(design, target, bounds=(lower, np.inf)).x
    predicted = rows @ solution
    errors = np.abs(predicted - measured) / measured
    efficiency = {c: float(1.0 / solution[i]) for i, c in enumerate(OP_CLASSES)}
    small_gemm_rows = {g: float(solution[classes + j] * ROWS_REF
                                / solution[OP_CLASSES.index(g)])
                       for j, g in enumerate(GEMM_CLASSES)}
    report = {
        "table_model": table.model_name,
        "table_backend": table.backend,
        "blocks": len(entries),
        "train_mape_pct": round(float(errors.mean() * 100), 2),
        "classes_seen": [c for i, c in enumerate(OP_CLASSES) if rows[:, i].any()],
    }
    return device.with_fit(efficiency, float(solution[-2] * 1e6), report,
                           view_us=float(solution[-1] * 1e6), small_gemm_rows=small_gemm_rows)
