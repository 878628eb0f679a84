"""Device profiles: peak compute per dtype, memory bandwidth, launch overhead, efficiencies.

Built-in profiles live in ``snapc/devices/<name>.toml`` with the public source of every field
in a comment. Users pass their own as a ``.toml`` or ``.json`` file with the same fields.
``local-cpu`` takes its peak and bandwidth from this machine (see ``local_cpu.py``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from snapc.cost.work import DTYPE_BYTES, OP_CLASSES
from snapc.errors import SnapcError, UnknownNameError

__all__ = ["DeviceProfile", "DeviceError", "load_device", "builtin_devices", "DEVICES_DIR"]

DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"
LOCAL_CPU = "local-cpu"


class DeviceError(SnapcError):
    """A device profile file that cannot be read or misses a field."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the roofline needs to know about a device.

    ``peak_tflops`` maps fp32/fp16/int8 to dense peak TFLOPS (TOPS for int8);
    ``efficiency`` maps each op class (conv, matmul, attention, norm, elementwise) to the
    fraction of its roofline time it reaches; ``launch_us`` is the fixed cost per kernel;
    ``fused_attention`` says the score matrix stays on chip; ``fuses_elementwise`` says
    element-wise epilogues are folded into the producing kernel; ``view_us`` is the dispatch
    cost of a view op (reshape, permute) in eager runtimes. ``small_gemm_rows`` maps conv
    and matmul to the GEMM row count M at which that class reaches half its efficiency
    (efficiency x M / (M + m); absent or 0: no size effect); it is fitted from measured
    tables, as small-spatial convs on CPUs and GPUs fall well below large ones.
    ``compute_units`` (SMs on an NVIDIA GPU) and ``attention_query_tile`` (query rows per
    thread block of the fused attention kernel, per dtype) let the roofline charge a fused
    attention for compute units left idle (see ``roofline.py``; 0 or absent: not modelled).
    ``fit`` records how the efficiencies were fitted (None for priors).
    """

    name: str
    description: str
    peak_tflops: Mapping[str, float]
    memory_gbps: float
    launch_us: float
    efficiency: Mapping[str, float]
    fused_attention: bool = False
    fuses_elementwise: bool = False
    view_us: float = 0.0
    small_gemm_rows: Mapping[str, float] = field(default_factory=dict)
    compute_units: int = 0
    attention_query_tile: Mapping[str, int] = field(default_factory=dict)
    source: str = ""
    fit: Mapping[str, Any] | None = field(default=None, compare=False)

    def peak_flops(self, dtype: str) -> float:
        """Return the peak FLOP/s for ``dtype`` (fp32, fp16, int8), falling back to fp32."""
        return 1e12 * float(self.peak_tflops.get(dtype, self.peak_tflops["fp32"]))

    def bandwidth(self) -> float:
        """Return the memory bandwidth in bytes/s."""
        return 1e9 * self.memory_gbps

    def with_fit(self, efficiency: Mapping[str, float], launch_us: float,
                 report: Mapping[str, Any], view_us: float | None = None,
                 small_gemm_rows: Mapping[str, float] | None = None) -> DeviceProfile:
        """Return a copy with fitted efficiencies and overheads (this one is unchanged)."""
        return replace(self, efficiency=dict(efficiency), launch_us=float(launch_us),
                       view_us=self.view_us if view_us is None else float(view_us),
                       small_gemm_rows=dict(self.small_gemm_rows if small_gemm_rows is None
                                            else small_gemm_rows),
                       fit=dict(report))

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (loadable again with :func:`load_device`)."""
        data = asdict(self)
        data["peak_tflops"] = dict(self.peak_tflops)
        data["efficiency"] = dict(self.efficiency)
        data["small_gemm_rows"] = dict(self.small_gemm_rows)
        data["attention_query_tile"] = dict(self.attention_query_tile)
        return data


def builtin_devices() -> list[str]:
    """Return the names of the built-in device profiles."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.toml"))


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DeviceError(f"cannot read device profile {path}: {first}; fix the file "
                          "(see snapc/devices/*.toml for the fields)") from exc


def _positive(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise DeviceError(f"{where}: '{key}' must be a positive number, got {value!r}; "
                          "fix the device profile")
    return float(value)


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DeviceError(f"{where}: '{key}' must be a whole number >= 0, got {value!r}; "
                          "fix the device profile")
    return value


def _tiles(value: object, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DeviceError(f"{where}: 'attention_query_tile' must be a table of dtype = rows, "
                          f"got {value!r}; fix the device profile")
    unknown = sorted(set(value) - set(DTYPE_BYTES))
    if unknown:
        raise DeviceError(f"{where}: unknown dtype(s) {unknown} in attention_query_tile; "
                          f"use {sorted(DTYPE_BYTES)}")
    return {str(k): _count(value, k, where) for k in value}


def profile_from_dict(data: Mapping[str, Any], where: str) -> DeviceProfile:
    """Return a validated DeviceProfile from parsed TOML/JSON ``data``; ``where`` names the
    file in errors. Raises DeviceError naming the first bad field."""
    peaks = data.get("peak_tflops")
    if not isinstance(peaks, Mapping) or "fp32" not in peaks:
        raise DeviceError(f"{where}: needs a [peak_tflops] table with at least fp32; "
                          "fix the device profile")
    unknown = sorted(set(peaks) - set(DTYPE_BYTES))
    if unknown:
        raise DeviceError(f"{where}: unknown dtype(s) {unknown} in peak_tflops; "
                          f"use {sorted(DTYPE_BYTES)}")
    effs = data.get("efficiency")
    if not isinstance(effs, Mapping):
        raise DeviceError(f"{where}: needs an [efficiency] table with {list(OP_CLASSES)}")
    missing = [c for c in OP_CLASSES if c not in effs]
    if missing:
        raise DeviceError(f"{where}: efficiency misses {missing}; give all of "
                          f"{list(OP_CLASSES)}")
    return DeviceProfile(
        name=str(data.get("name") or Path(where).stem),
        description=str(data.get("description", "")),
        peak_tflops={k: _positive(peaks, k, where) for k in peaks},
        memory_gbps=_positive(data, "memory_gbps", where),
        launch_us=float(data.get("launch_us", 0.0)),
        efficiency={c: _positive(effs, c, where) for c in OP_CLASSES},
        fused_attention=bool(data.get("fused_attention", False)),
        fuses_elementwise=bool(data.get("fuses_elementwise", False)),
        view_us=float(data.get("view_us", 0.0)),
        small_gemm_rows={str(k): float(v) for k, v in
                         dict(data.get("small_gemm_rows") or {}).items()},
        compute_units=_count(data, "compute_units", where),
        attention_query_tile=_tiles(data.get("attention_query_tile"), where),
        source=where,
        fit=data.get("fit"),
    )


def load_device(name_or_path: str | Path) -> DeviceProfile:
    """Return the device profile for a built-in name or a ``.toml``/``.json`` file.

    Raises UnknownNameError listing the built-in names for an unknown name, DeviceError for a
    file that cannot be read or misses a field.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".toml", ".json"):
        if not path.is_file():
            raise DeviceError(f"device profile file not found: {path}; pass an existing "
                              f".toml/.json file or one of {', '.join(builtin_devices())}")
        return profile_from_dict(_read(path), str(path))
    if text not in builtin_devices():
        raise UnknownNameError("device", text, builtin_devices() + ["<file.toml|file.json>"])
    data = _read(DEVICES_DIR / f"{text}.toml")
    if text == LOCAL_CPU:
        from snapc.cost.local_cpu import probe_local_cpu

        data = {**data, **probe_local_cpu()}
    return profile_from_dict(data, f"built-in:{text}")
