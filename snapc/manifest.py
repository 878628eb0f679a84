"""The manifest written beside every artifact: what was built, from what, and how it verified."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from snapc.graph import Graph

__all__ = ["Manifest", "TensorSpec", "tensor_specs", "versions", "quantization_summary",
           "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def tensor_specs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> list[TensorSpec]:
    """Return TensorSpecs for parallel names and tensors."""
    return [TensorSpec(n, tuple(int(d) for d in t.shape), str(t.dtype).replace("torch.", ""))
            for n, t in zip(names, tensors, strict=True)]


def quantization_summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return the manifest's view of quantization records: records per scheme and, per layer,
    its scheme and parameters (tensors as shapes; see passes.quantize.records_summary)."""
    from snapc.passes.quantize import records_summary

    counts: dict[str, int] = {}
    for record in records.values():
        counts[record["scheme"]] = counts.get(record["scheme"], 0) + 1
    return {"counts": counts, "layers": records_summary(records)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(*extra: str) -> dict[str, str | None]:
    """Return versions of snapc, python, torch and the named distributions."""
    out = {"snapc": _version("snapc"), "python": platform.python_version(),
           "torch": torch.__version__}
    out.update({name: _version(name) for name in extra})
    return out


@dataclass
class Manifest:
    """Everything needed to use and trust an artifact folder; serialised as manifest.json."""

    target: str
    model: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]
    sampler: dict[str, Any] | None = None  # the model's stored sampler (also in model.sampler)
    target_options: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_graph(cls, graph: Graph, target: str, **kwargs: Any) -> Manifest:
        """Return a manifest pre-filled with the graph's model info, inputs and output, the
        sampler stored with the weights (a step-distilled model's steps, guidance, spacing;
        None for the base protocol) and, when the graph has quantization records, its
        per-layer quantization choices."""
        out_val = torch.empty(graph.output_shape(), dtype=torch.float32)
        if graph.quant and "quantization" not in kwargs:
            kwargs["quantization"] = quantization_summary(graph.quant)
        return cls(
            target=target,
            model={**graph.source.to_json(), "removed_blocks": list(graph.removed),
                   "params": graph.param_count()},
            inputs=tensor_specs(graph.input_names, graph.example_inputs),
            outputs=tensor_specs(("noise_pred",), (out_val,)),
            **{"sampler": graph.source.sampler, **kwargs},
        )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        data = asdict(self)
        data["inputs"] = [s.to_json() for s in self.inputs]
        data["outputs"] = [s.to_json() for s in self.outputs]
        return data

    def write(self, folder: str | Path) -> Path:
        """Write manifest.json into ``folder`` and return its path."""
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """Read manifest.json from ``folder``."""
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text())
        data["inputs"] = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])
                          for d in data["inputs"]]
        data["outputs"] = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])
                           for d in data["outputs"]]
        return cls(**data)
