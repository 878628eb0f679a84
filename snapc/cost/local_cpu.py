"""Read this machine's CPU peak FLOP/s and memory bandwidth for the ``local-cpu`` profile.

Peak: usable cores x clock x FLOPs per cycle from the ISA flags in ``/proc/cpuinfo``.
Bandwidth: there is no file that states it, so it is measured: the best of five copies of a
64 MiB tensor (read + write) with torch, a STREAM-copy-like probe taking about 0.1 s.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["probe_local_cpu", "flops_per_cycle"]

_CPUINFO = Path("/proc/cpuinfo")
_CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


def flops_per_cycle(flags: set[str]) -> int:
    """Return fp32 FLOPs per cycle per core for the ISA ``flags`` (two FMA pipes assumed,
    as on Intel since Haswell and AMD since Zen 2)."""
    if "avx512f" in flags:
        return 64  # 2 x 16-lane FMA
    if "avx2" in flags and "fma" in flags:
        return 32  # 2 x 8-lane FMA
    if "avx" in flags:
        return 16
    if "asimd" in flags or "neon" in flags:
        return 16  # 2 x 4-lane FMA on common aarch64 cores
    return 8


def _cpuinfo() -> tuple[set[str], float | None, str]:
    flags: set[str] = set()
    mhz: float | None = None
    model = "unknown CPU"
    if not _CPUINFO.is_file():
        return flags, mhz, model
    for line in _CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
        elif key == "model name" and model == "unknown CPU":
            model = value.strip()
    return flags, mhz, model


def _clock_ghz(cpuinfo_mhz: float | None) -> float:
    if _CPUFREQ.is_file():
        return int(_CPUFREQ.read_text().strip()) / 1e6
    return (cpuinfo_mhz or 2000.0) / 1e3


def _copy_bandwidth_gbps() -> float:
    import torch

    src = torch.ones(16 * 1024 * 1024)  # 64 MiB of fp32, well above any L3
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


@lru_cache(maxsize=1)
def probe_local_cpu() -> dict[str, Any]:
    """Return {peak_tflops, memory_gbps, description} measured or read on this machine."""
    flags, mhz, model = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz = _clock_ghz(mhz)
    fp32 = (cores or 1) * ghz * flops_per_cycle(flags) / 1e3
    fp16 = 2 * fp32 if "avx512_fp16" in flags else fp32
    int8 = 4 * fp32 if ({"avx512_vnni", "avx_vnni"} & flags) else 2 * fp32
    return {
        "peak_tflops": {"fp32": fp32, "fp16": fp16, "int8": int8},
        "memory_gbps": _copy_bandwidth_gbps(),
        "description": f"{model}, {cores} core(s) at {ghz:.2f} GHz (PyTorch eager)",
    }
