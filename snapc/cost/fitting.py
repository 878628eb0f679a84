"""Fit a device's per-class efficiencies and launch overhead to a measured latency table.

With ``x_c = 1 / efficiency_c`` the model of a block is linear in the unknowns::

    t_block = sum_c x_c * R_c(block) + L * launches(block) + V * views(block)

where ``R_c`` is the summed roofline time (max of compute and memory time at 100%) of the
block's class-``c`` nodes, ``L`` the per-kernel overhead and ``V`` the dispatch cost of a view
op (0 on devices that compile views away). The fit minimises the relative
residuals ``(model - measured) / measured`` (so small blocks count as much as large ones) with
non-negative unknowns (``scipy.optimize.lsq_linear``), plus a weak pull towards the profile's
priors so that classes the table does not exercise keep their prior.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from snapc.cost.device import DeviceProfile
from snapc.cost.roofline import roofline
from snapc.cost.table import LatencyTable, TableError
from snapc.cost.work import OP_CLASSES, VIEW, NodeWork, dtype_key

__all__ = ["fit", "features"]

PRIOR_WEIGHT = 0.01  # weight of each prior row relative to one measured block (weak pull)
_MAX_EFFICIENCY = 100.0


def features(work: Iterable[NodeWork], device: DeviceProfile, dtype: str) -> np.ndarray:
    """Return ``[R_conv, R_matmul, R_attention, R_norm, R_elementwise, launches, views]``
    (roofline seconds per class, then the kernel and view counts) for the nodes in ``work``."""
    row = np.zeros(len(OP_CLASSES) + 2)
    for item in work:
        line = roofline(item, device, dtype)
        if line is None:
            continue
        if line.op_class == VIEW:
            row[-1] += 1
            continue
        row[OP_CLASSES.index(line.op_class)] += line.base_s
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

    prior = np.array([1.0 / device.efficiency[c] for c in OP_CLASSES]
                     + [max(device.launch_us, 1e-3) * 1e-6, max(device.view_us, 1e-3) * 1e-6])
    weight = np.sqrt(PRIOR_WEIGHT)
    design = np.vstack([design, np.diag(weight / prior)])
    target = np.concatenate([target, np.full(len(prior), weight)])

    from scipy.optimize import lsq_linear

    lower = np.concatenate([np.full(len(OP_CLASSES), 1.0 / _MAX_EFFICIENCY), [0.0, 0.0]])
    solution = lsq_linear(design, target, bounds=(lower, np.inf)).x
    predicted = rows @ solution
    errors = np.abs(predicted - measured) / measured
    efficiency = {c: float(1.0 / solution[i]) for i, c in enumerate(OP_CLASSES)}
    report = {
        "table_model": table.model_name,
        "table_backend": table.backend,
        "blocks": len(entries),
        "train_mape_pct": round(float(errors.mean() * 100), 2),
        "classes_seen": [c for i, c in enumerate(OP_CLASSES) if rows[:, i].any()],
    }
    return device.with_fit(efficiency, float(solution[-2] * 1e6), report,
                           view_us=float(solution[-1] * 1e6))
