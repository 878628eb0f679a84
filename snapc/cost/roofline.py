"""The roofline of one node on one device: max(compute time, memory time) / efficiency + launches.

Views cost only the device's per-op dispatch overhead ``view_us`` (eager runtimes run them as
ATen calls; compiled runtimes, ``fuses_elementwise``, drop them).

Shared by the estimator (``model.py``) and the least-squares fit (``fit.py``), which needs the
same per-class base times as its features.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapc.cost.device import DeviceProfile
from snapc.cost.work import DTYPE_BYTES, VIEW, NodeWork

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
    return Roofline(work.op_class, work.flops / device.peak_flops(work.compute or dtype),
                    nbytes / device.bandwidth(), launches)


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
