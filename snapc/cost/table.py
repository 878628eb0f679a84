"""Measured latency tables: per-block timings keyed by block signature, plus the whole model.

A table is JSON (``format: snapc-latency-table/1``) written by ``snapc profile``. Each block
entry holds its signature (kind, channels, resolution, sequence and context length, dtype,
batch), its timing (median, 10th/90th percentile, samples) and the roofline work of its nodes,
so that efficiencies can be fitted from the table alone. The model signature (architecture
config, input shapes, dtype) says which model the whole-model and non-block figures belong to.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapc.artifacts import atomic_output_file
from snapc.cost.work import NodeWork
from snapc.errors import SnapcError

__all__ = ["TABLE_FORMAT", "Timing", "BlockEntry", "LatencyTable", "TableError",
           "signature_key", "model_signature", "summarize"]

TABLE_FORMAT = "snapc-latency-table/1"


class TableError(SnapcError):
    """A latency table file that is missing, malformed or for another device."""


def signature_key(signature: Mapping[str, Any]) -> str:
    """Return the canonical string key of a block signature (JSON with sorted keys)."""
    return json.dumps(dict(signature), sort_keys=True, separators=(",", ":"))


def model_signature(config: Mapping[str, Any] | None, input_shapes: Sequence[Sequence[int]],
                    dtype: str, fallback: Iterable[str] = ()) -> str:
    """Return a 16-hex-digit hash of the architecture config, input shapes and dtype.

    Removing blocks does not change it: the non-block cost of a pruned model is the same.
    ``fallback`` (e.g. block signature keys) stands in for a missing config.
    """
    payload = {"config": dict(config) if config else sorted(fallback),
               "inputs": [list(s) for s in input_shapes], "dtype": dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one thing: median and 10th/90th percentiles in ms."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: tuple[float, ...] = ()

    @property
    def spread(self) -> float:
        """Return (p90 - p10) / median: the relative spread of the samples."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "spread": round(self.spread, 4),
                "samples_ms": [round(s, 4) for s in self.samples_ms]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Timing:
        """Return the Timing written by :meth:`to_json`."""
        return cls(float(data["median_ms"]), float(data["p10_ms"]), float(data["p90_ms"]),
                   tuple(float(s) for s in data.get("samples_ms", ())))


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Return the median and 10th/90th percentiles of ``samples_ms`` (at least one sample)."""
    ordered = sorted(samples_ms)
    if len(ordered) == 1:
        return Timing(ordered[0], ordered[0], ordered[0], tuple(samples_ms))
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return Timing(statistics.median(ordered), deciles[0], deciles[-1], tuple(samples_ms))


@dataclass(frozen=True)
class BlockEntry:
    """One measured block: name, stage, signature, timing, MACs and its nodes' work."""

    name: str
    stage: str
    signature: Mapping[str, Any]
    timing: Timing
    macs: int
    work: tuple[NodeWork, ...] = ()

    @property
    def key(self) -> str:
        """Return the signature key this entry matches."""
        return signature_key(self.signature)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "stage": self.stage, "signature": dict(self.signature),
                **self.timing.to_json(), "macs": self.macs,
                "work": [w.to_json() for w in self.work]}


@dataclass(frozen=True)
class LatencyTable:
    """Measured latencies of one model's blocks on one device with one backend."""

    device: str
    backend: str
    model_name: str
    model_signature: str
    dtype: str
    blocks: tuple[BlockEntry, ...]
    whole_model: Timing | None = None
    non_block_work: tuple[NodeWork, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def sum_blocks_ms(self) -> float:
        """Return the sum of the block medians."""
        return sum(b.timing.median_ms for b in self.blocks)

    def non_block_ms(self) -> float | None:
        """Return whole-model median minus the sum of block medians (None if not measured)."""
        if self.whole_model is None:
            return None
        return self.whole_model.median_ms - self.sum_blocks_ms()

    def lookup(self, signature: Mapping[str, Any]) -> float | None:
        """Return the measured ms of a block signature (median over entries that share it)."""
        key = signature_key(signature)
        found = [b.timing.median_ms for b in self.blocks if b.key == key]
        return statistics.median(found) if found else None

    def subset(self, names: Iterable[str]) -> LatencyTable:
        """Return a table holding only the named blocks and no whole-model figure."""
        wanted = set(names)
        return LatencyTable(self.device, self.backend, self.model_name, self.model_signature,
                            self.dtype, tuple(b for b in self.blocks if b.name in wanted),
                            None, (), dict(self.meta))

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document of the table."""
        non_block = self.non_block_ms()
        return {
            "format": TABLE_FORMAT,
            "device": self.device,
            "backend": self.backend,
            "model": {"name": self.model_name, "signature": self.model_signature},
            "dtype": self.dtype,
            "meta": dict(self.meta),
            "sum_blocks_ms": self.sum_blocks_ms(),
            "whole_model": self.whole_model.to_json() if self.whole_model else None,
            "non_block_ms": non_block,
            "non_block_work": [w.to_json() for w in self.non_block_work],
            "blocks": [b.to_json() for b in self.blocks],
        }

    def write(self, path: str | Path) -> Path:
        """Write the table as JSON to ``path`` (atomically: a temp file renamed into place)
        and return the path."""
        with atomic_output_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "<table>") -> LatencyTable:
        """Return the table in a parsed JSON document; raise TableError naming what is wrong."""
        if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise TableError(f"{where} is not a snapc latency table (format {found!r}, "
                             f"expected {TABLE_FORMAT!r}); write one with `snapc profile`")
        try:
            blocks = tuple(
                BlockEntry(str(b["name"]), str(b.get("stage", "")), dict(b["signature"]),
                           Timing.from_json(b), int(b.get("macs", 0)),
                           tuple(NodeWork.from_json(w) for w in b.get("work", ())))
                for b in data["blocks"])
            whole = data.get("whole_model")
            return cls(
                device=str(data["device"]), backend=str(data.get("backend", "")),
                model_name=str(data["model"]["name"]),
                model_signature=str(data["model"]["signature"]),
                dtype=str(data.get("dtype", "float32")), blocks=blocks,
                whole_model=Timing.from_json(whole) if whole else None,
                non_block_work=tuple(NodeWork.from_json(w)
                                     for w in data.get("non_block_work", ())),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TableError(f"malformed latency table {where}: bad or missing field {exc}; "
                             "re-run `snapc profile` to write it again") from exc

    @classmethod
    def read(cls, path: str | Path) -> LatencyTable:
        """Read a table file; raise TableError for a missing, non-JSON or malformed file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TableError(f"latency table not found: {path}; write one with "
                             "`snapc profile MODEL -o table.json`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TableError(f"malformed latency table {path}: {exc}; re-run `snapc profile` "
                             "to write it again") from exc
        return cls.from_json(data, str(path))
