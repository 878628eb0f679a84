"""The roofline of one node on one device: max(compute time, memory time) / efficiency + launches.

Views cost only the device's per-op dispatch overhead ``view_us`` (eager runtimes run them as
ATen calls; compiled runtimes, ``fuses_elementwise``, drop them).

A fused attention kernel (FlashAttention, PyTorch's memory-efficient kernel) gives each
block of ``attention_query_tile`` query rows (per batch and head) to one compute unit (an SM);
when there are fewer such tiles than the device has units, or the last wave is partial, the
idle units' share is lost: the roofline time is scaled by ``waves x units / tiles``. At
SD-1.5's 8x8 and 16x16 resolutions that is what makes attention far slower per FLOP than at
32x32 on an H100 (kernel traces in ``bench/RESULTS.md``).

Shared by the estimator (``model.py``) and the least-squares fit (``fitting.py``), which needs the
same per-class base times as its features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from snapc.cost.device import DeviceProfile
from snapc.cost.work import ATTENTION, DTYPE_BYTES, VIEW, NodeWork

__all__ = ["Roofline", "roofline", "node_seconds"]

# A non-fused attention writes the scores, reads them for softmax, writes the probabilities
# and reads them for P @ V, and runs three kernels (QK^T, softmax, PV) instead of one.
_SCORE_PASSES = 4
_UNFUSED_ATTENTION_LAUNCHES = 3


@dataclass(frozen=True)
class Roofline:
    """One node's roofline before efficiencies: base seconds, the bound and kernel launches."""

    op_class: str
    compute_s: float
    memory_s: float
    launches: int

    @property
    def base_s(self) -> float:
        """Return max(compute, memory): the time at 100% efficiency."""
        return max(self.compute_s, self.memory_s)

    @property
    def memory_bound(self) -> bool:
        """True when moving bytes takes longer than the arithmetic."""
        return self.memory_s > self.compute_s


def roofline(work: NodeWork, device: DeviceProfile, dtype: str) -> Roofline | None:
    """Return the roofline of ``work`` on ``device`` computing in ``dtype`` (fp32/fp16/int8),
    or None when the device fuses it into its producer (element-wise epilogues) or compiles
    views away."""
    if (work.fusable or work.op_class == VIEW) and device.fuses_elementwise:
        return None
    nbytes, launches = work.bytes, work.launches
    if work.attention_scores and not device.fused_attention:
        nbytes += _SCORE_PASSES * work.attention_scores * DTYPE_BYTES[dtype]
        launches = _UNFUSED_ATTENTION_LAUNCHES
    waves = _attention_wave_factor(work, device, dtype)
    return Roofline(work.op_class, waves * work.flops / device.peak_flops(work.compute or dtype),
                    waves * nbytes / device.bandwidth(), launches)


def _attention_wave_factor(work: NodeWork, device: DeviceProfile, dtype: str) -> float:
    """Return how much slower than its roofline a fused attention runs because its query
    tiles do not fill the device's compute units evenly (1.0 when the profile gives no units
    or tile, for other ops, and for attention that is not fused)."""
    tile = device.attention_query_tile.get(dtype, 0)
    units = device.compute_units
    if work.op_class != ATTENTION or not (work.rows and tile and units) \
            or not device.fused_attention:
        return 1.0
    tiles = math.ceil(work.rows / tile)
    return math.ceil(tiles / units) * units / tiles


def node_seconds(work: NodeWork, device: DeviceProfile, dtype: str) -> float:
    """Return the estimated seconds of ``work`` on ``device``: roofline / efficiency of its op
    class, plus the launch overhead of each kernel."""
    line = roofline(work, device, dtype)
    if line is None:
        return 0.0
    if line.op_class == VIEW:
        return device.view_us * 1e-6
    seconds = line.base_s / device.efficiency[line.op_class]
    half_rows = device.small_gemm_rows.get(line.op_class, 0.0)
    if half_rows and work.rows:
        seconds *= 1.0 + half_rows / work.rows  # efficiency x M / (M + m)
    return seconds + line.launches * device.launch_us * 1e-6
