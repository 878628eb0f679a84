"""MetaSchedule tuning records of the TVM targets: the records folder, its checks, and where in
the Relax pipeline tuned schedules are extracted and applied.

A records folder (written by ``snapc tune -o RECORDS``) holds TVM's own MetaSchedule JSON
database, ``database_workload.json`` (each kernel's TIR, keyed by its structural hash) and
``database_tuning_record.json`` (measured schedules of those kernels), for **one** TVM target
on **one** device, plus ``tuning.json``, snapc's index: the snapc target name, the TVM target,
the device key (``local`` or the RPC tracker key), the models tuned into it and each kernel's
best latency. Tuning a second model into the same folder skips kernels already there (same
workload hash) and adds the rest; ``snapc compile --tuning RECORDS`` applies every record whose
kernel occurs in the model (``relax.transform.MetaScheduleApplyDatabase``), and dlight or the
default CPU lowering handles the rest.

Tuned schedules are applied right where tasks are extracted: after legalization and fusion
(``FuseTIR``), before the dlight default schedules on GPUs and before dataflow lowering on CPUs.

Requires: apache-tvm 0.27 with apache-tvm-ffi 0.1.14.x: with 0.1.15 serializing any TIR node to
JSON (``tvm.ir.save_json``, the JSON database) crashes the process (SIGSEGV in
``tvm::ffi::ToJSONGraph`` on a DataType field); ``check_ffi`` says so before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapc.errors import SnapcError, ToolMissingError

if TYPE_CHECKING:
    import tvm

__all__ = ["INDEX", "WORKLOADS", "TUNING_RECORDS", "APPLY_BEFORE", "check_ffi", "read_index",
           "check_records", "open_database", "target_key", "count_records"]

INDEX, WORKLOADS, TUNING_RECORDS = ("tuning.json", "database_workload.json",
                                    "database_tuning_record.json")
# Relax passes before which tasks are extracted and tuned schedules applied (the first present).
APPLY_BEFORE = ("ApplyDefaultSchedule", "RewriteDataflowReshape")
FFI_OK = "0.1.14"


def check_ffi() -> None:
    """Raise ToolMissingError when the installed apache-tvm-ffi crashes TVM 0.27's JSON database."""
    import tvm_ffi

    version = str(tvm_ffi.__version__)
    if not version.startswith(FFI_OK):
        raise ToolMissingError(
            f"apache-tvm-ffi {version} crashes apache-tvm 0.27 when it writes MetaSchedule "
            "records (SIGSEGV serializing TIR); pip install 'apache-tvm-ffi==0.1.14.post1'")


def target_key(target: tvm.target.Target | dict[str, Any]) -> dict[str, Any]:
    """Return the parts of a TVM target that decide which schedules are valid (kind, triple,
    CPU, features, arch, host triple), as a JSON-ready dict."""
    spec = target if isinstance(target, dict) else json.loads(str(target))
    keep = ("kind", "mtriple", "mcpu", "mattr", "arch", "device", "keys")  # not num-cores
    key = {k: spec[k] for k in keep if k in spec}
    host = spec.get("host")
    if isinstance(host, dict) and "mtriple" in host:
        key["host_mtriple"] = host["mtriple"]
    return key


def read_index(folder: Path) -> dict[str, Any]:
    """Return ``folder``'s tuning.json; raise SnapcError when the folder or a file is missing
    or not what ``snapc tune`` writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SnapcError(f"tuning records {folder} do not exist; write them with `snapc tune "
                         f"MODEL --target T -o {folder}`")
    missing = [n for n in (INDEX, WORKLOADS, TUNING_RECORDS) if not (folder / n).is_file()]
    if missing:
        raise SnapcError(f"{folder} is not a snapc tuning-records folder (no "
                         f"{', '.join(missing)}); write it with `snapc tune ... -o {folder}`")
    current = INDEX
    try:
        index = json.loads((folder / INDEX).read_text())
        for current in (WORKLOADS, TUNING_RECORDS):
            for line in (folder / current).read_text().splitlines():
                if line.strip():
                    json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapcError(f"corrupt tuning records in {folder}: {current} is not valid JSON "
                         f"({str(exc).splitlines()[0]}); tune again into a new folder") from None
    if not isinstance(index, dict) or not {"target", "tvm_target", "device"} <= set(index):
        raise SnapcError(f"corrupt tuning records in {folder}: {INDEX} lacks target, "
                         "tvm_target or device; tune again into a new folder")
    return index


def check_records(folder: Path, target: str, tvm_target: tvm.target.Target | dict[str, Any],
                  device: str | None = None) -> dict[str, Any]:
    """Return ``folder``'s index after checking that its records were tuned for snapc target
    ``target`` with the same TVM target (and for ``device`` when given)."""
    index = read_index(folder)
    wanted = target_key(tvm_target)
    if index["target"] != target or target_key(index["tvm_target"]) != wanted:
        raise SnapcError(
            f"tuning records {folder} are for target {index['target']} "
            f"({_describe(index['tvm_target'])}), not {target} ({_describe(wanted)}); tune "
            f"for this target with `snapc tune MODEL --target {target} -o NEW_RECORDS`")
    if device is not None and index["device"] != device:
        raise SnapcError(f"tuning records {folder} were measured on device '{index['device']}',"
                         f" not '{device}'; give another -o for this device")
    return index


def _describe(spec: dict[str, Any]) -> str:
    key = target_key(spec)
    return " ".join(f"{k}={v}" for k, v in key.items() if k != "keys")


def open_database(folder: Path) -> Any:
    """Return the MetaSchedule JSON database in ``folder`` (created when absent)."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    return ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS),
                                    path_tuning_record=str(folder / TUNING_RECORDS),
                                    allow_missing=True)


def count_records(folder: Path) -> tuple[int, int]:
    """Return (workloads, tuning records) stored in ``folder``."""
    def lines(name: str) -> int:
        path = Path(folder) / name
        return sum(1 for ln in path.read_text().splitlines() if ln.strip()) if path.exists() else 0

    return lines(WORKLOADS), lines(TUNING_RECORDS)
