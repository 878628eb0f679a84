"""Apply per-layer weight quantization records to a Core ML mlprogram.

A quantization record names a layer (``down_blocks.0.resnets.0.conv1``) or a weight
(``...conv1.weight``) and a scheme:

- ``palette8`` / ``palette6`` / ``palette4`` / ``palette2`` / ``palette1``: k-means
  palettization with a per-tensor look-up table of 2**n fp16 values (Apple recommends >= 6 bits
  after training);
- ``w8``: linear symmetric int8, one scale per output channel;
- ``fp16``: leave the weight as converted.

``QuantRecords`` is the mapping ``{name: {"scheme": ...}}`` the quantization pass puts on a graph;
a global ``palettize=n`` from the options applies ``palette{n}`` to every weight that has no
record. Both go through ``coremltools.optimize.coreml`` (``palettize_weights``,
``linear_quantize_weights``) with one config per constant.

Records *applied* already (the graph's own records: the target converts the graph whose weights
hold the quantize-dequantized values, ``apply_records_to_module``) are realised exactly: a
palette's look-up table is the weight's unique values (no k-means), and int8 recovers the
record's per-channel scales (``max |w| / 127``); they differ from the records only by fp16
rounding. The unique values come from a histogram of the fp16 bit patterns (``_fp16_unique``),
not from ``np.unique``: numpy >= 2.0 sorts float16 with an AVX-512 kernel (x86-simd-sort) that
mis-orders some arrays on some CPUs (seen on an AMD EPYC with AVX-512), so ``np.unique`` found
18-54 "unique" values in weights holding 16 and coremltools' mode ``unique`` stored them with
6-bit instead of 4-bit indices.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapc.errors import SnapcError

__all__ = ["QuantRecords", "SCHEMES", "QuantPlan", "plan_quantization", "apply_quantization",
           "MIN_WEIGHT_ELEMENTS", "weight_sizes", "compressed_weights"]

QuantRecords = Mapping[str, Mapping[str, Any]]
SCHEMES = ("palette8", "palette6", "palette4", "palette2", "palette1", "w8", "fp16")

# Weights with fewer elements stay fp16. Above it coremltools clusters fp16 weights with the
# exact 1-d k-means (kmeans1d, bundled); below it it would need scikit-learn. Biases and norm
# scales are all smaller; in SD-1.5 they are < 0.1% of the weight bytes.
MIN_WEIGHT_ELEMENTS = 10_000

_SUFFIXES = ("_to_fp16", "_to_fp32", "_cast_fp16")


def _const_key(const_name: str) -> str:
    """Return the torch-style key of a converted weight constant (``net_a_0_b_weight_to_fp16`` ->
    ``a_0_b_weight``)."""
    name = const_name
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name.removeprefix("net_").removeprefix("p_net_")


def _record_key(name: str) -> str:
    """Return the key of a record name: a layer gets ``.weight``; dots become underscores."""
    name = name.removeprefix("net.")
    if not re.search(r"\.(weight|bias)$", name):
        name = f"{name}.weight"
    return name.replace(".", "_")


@dataclass(frozen=True)
class QuantPlan:
    """Which constant gets which scheme: {const name: scheme}; the records that matched no
    constant, and the constants left fp16 because they hold < MIN_WEIGHT_ELEMENTS values.

    ``exact``: constants whose values are already quantized (applied records), compressed
    without k-means; ``not_found``: applied records that name no constant (a pass merged the
    weight into another one): stored fp16, with the quantized values.
    """

    schemes: dict[str, str]
    unmatched: tuple[str, ...]
    too_small: tuple[str, ...] = ()
    exact: frozenset[str] = frozenset()
    not_found: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """Return how many constants use each scheme."""
        out: dict[str, int] = {}
        for scheme in self.schemes.values():
            out[scheme] = out.get(scheme, 0) + 1
        return out


def _map_records(by_key: dict[str, str], records: QuantRecords | None
                 ) -> tuple[dict[str, str], list[str]]:
    """Return ({const name: scheme}, record names that match no constant)."""
    schemes: dict[str, str] = {}
    unmatched = []
    for name, record in (records or {}).items():
        scheme = str(record.get("scheme", ""))
        if scheme not in SCHEMES:
            raise SnapcError(f"quantization record '{name}' has scheme '{scheme}'; "
                             f"use one of {', '.join(SCHEMES)}")
        const = by_key.get(_record_key(name))
        if const is None:
            unmatched.append(name)
        else:
            schemes[const] = scheme
    return schemes, unmatched


def plan_quantization(
    weights: Mapping[str, int], records: QuantRecords | None, palettize: int | None,
    applied: QuantRecords | None = None,
) -> QuantPlan:
    """Map records (and the global ``palettize`` bits) onto constants.

    ``weights`` maps each weight constant of the program to its element count. ``applied``
    are records whose values the weights already hold (see the module docstring); ``records``
    override them. Returns a QuantPlan; raises SnapcError for an unknown scheme.
    """
    if palettize is not None and f"palette{palettize}" not in SCHEMES:
        raise SnapcError(f"cannot palettize to {palettize} bits; use 1, 2, 4, 6 or 8")
    by_key = {_const_key(name): name for name in weights}
    exact, not_found = _map_records(by_key, applied)
    schemes, unmatched = _map_records(by_key, records)
    schemes = {**exact, **schemes}
    if palettize is not None:
        for name, size in weights.items():
            if name not in schemes and size >= MIN_WEIGHT_ELEMENTS:
                schemes[name] = f"palette{palettize}"
    too_small = tuple(k for k, v in schemes.items()
                      if v != "fp16" and weights[k] < MIN_WEIGHT_ELEMENTS)
    schemes = {k: v for k, v in schemes.items()
               if v != "fp16" and weights[k] >= MIN_WEIGHT_ELEMENTS}
    exact_names = frozenset(k for k, v in exact.items() if schemes.get(k) == v)
    not_found = [n for n in not_found if applied[n]["scheme"] != "fp16"]  # fp16 anyway
    return QuantPlan(schemes, tuple(unmatched), too_small, exact_names, tuple(not_found))


def weight_sizes(program: Any) -> dict[str, int]:
    """Return {constant name: element count} of the float tensor constants of ``program``."""
    import numpy as np

    sizes = {}
    for op in program.functions["main"].operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.ndim >= 1:
            sizes[op.name] = int(val.size)
    return sizes


def compressed_weights(program: Any) -> dict[str, int]:
    """Return {constexpr op type: count} of ``program``: its weights stored compressed
    (palettes, int8), as the package will hold them."""
    counts: dict[str, int] = {}
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts


def apply_quantization(program: Any, plan: QuantPlan, workers: int = 1) -> None:
    """Compress the weights of ``program`` (edited in place) as ``plan`` says.

    Runs the graph passes behind ``coremltools.optimize.coreml.palettize_weights`` and
    ``linear_quantize_weights`` (palettization first, then int8) with one config per constant
    (``plan.exact`` palettes: look-up table = the weight's unique values),
    on the converted program itself: the public functions would serialize the model and run
    the whole conversion pipeline again for each call.
    """
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
    )

    palettes = {name: OpPalettizerConfig(mode="custom", lut_function=_unique_lut,
                                         granularity="per_tensor",
                                         weight_threshold=MIN_WEIGHT_ELEMENTS)
                if name in plan.exact else
                OpPalettizerConfig(nbits=int(s.removeprefix("palette")), mode="kmeans",
                                   granularity="per_tensor", num_kmeans_workers=workers,
                                   weight_threshold=MIN_WEIGHT_ELEMENTS)
                for name, s in plan.schemes.items() if s.startswith("palette")}
    int8 = {name: OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                          granularity="per_channel",
                                          weight_threshold=MIN_WEIGHT_ELEMENTS)
            for name, s in plan.schemes.items() if s == "w8"}
    for pass_name, configs in (("compression::palettize_weights", palettes),
                               ("compression::linear_quantize_weights", int8)):
        if not configs:
            continue
        graph_pass = PASS_REGISTRY[pass_name]
        graph_pass.set_options([PassOption("config", OptimizationConfig(op_name_configs=configs)),
                                PassOption("joint_compression", False)])
        with _histogram_unique():
            graph_pass(program)


def _fp16_unique(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(weight, return_inverse=True, return_counts=True)`` of an fp16 array, from a
    histogram of its 65,536 bit patterns (O(n), no sort); -0.0 counts as 0.0, as np.unique has
    it. Returns the values (ascending), the inverse (flat) and the counts."""
    bits = weight.reshape(-1).view(np.uint16)
    counts = np.bincount(bits, minlength=1 << 16)
    counts[0] += counts[0x8000]  # -0.0 == 0.0
    counts[0x8000] = 0
    patterns = np.nonzero(counts)[0]
    values = patterns.astype(np.uint16).view(np.float16)
    order = np.argsort(values.astype(np.float32), kind="stable")
    rank = np.zeros(1 << 16, dtype=np.intp)
    rank[patterns[order]] = np.arange(len(order))
    rank[0x8000] = rank[0]
    return values[order], rank[bits], counts[patterns[order]]


def _unique_lut(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the look-up table (the unique values of ``weight``, zero-padded to the fewest
    supported bits: 1, 2, 3, 4, 6 or 8) and the uint8 indices (flat) that rebuild it:
    coremltools' mode ``unique``, for fp16 without ``np.unique`` (see the module docstring)."""
    if weight.dtype == np.float16:
        values, inverse, _ = _fp16_unique(weight)
    else:
        values, inverse = np.unique(weight.reshape(-1), return_inverse=True)
    bits = next((b for b in (1, 2, 3, 4, 6, 8) if len(values) <= 1 << b), None)
    if bits is None:
        raise SnapcError(f"a palettized weight holds {len(values)} distinct fp16 values; "
                         "a look-up table holds at most 256")
    lut = np.zeros(1 << bits, dtype=weight.dtype)
    lut[: len(values)] = values
    return lut, inverse.astype(np.uint8)


@contextlib.contextmanager
def _histogram_unique() -> Iterator[None]:
    """Run coremltools' k-means palettization with ``_fp16_unique`` for its ``np.unique``.

    For an fp16 weight of 10,000+ values coremltools clusters the unique values weighted by
    their counts with kmeans1d (optimal 1-d k-means); finding them with ``np.unique`` argsorts
    the fp16 array, which numpy compares in software: 85% of palettizing (measured: 13.7 s of
    21.5 s for 50 M SD-shaped weights). Inside this context that step is the histogram above;
    the rest of coremltools' function (kmeans1d, look-up table, indices) is repeated as is, so
    the palettes and indices are coremltools' own (a zero's sign in the unique list aside).
    Scoped here, never applied at import.
    """
    from coremltools.models.neural_network import quantization_utils as utils
    from coremltools.optimize.coreml import _quantization_passes as passes

    original = passes._get_kmeans_lookup_table_and_weight

    def lookup(nbits: int, weight: np.ndarray, force_kmeans1d: bool = False,
               cluster_dim: int = 1, vector_axis: int | None = None) -> Any:
        if not (cluster_dim == 1 and weight.dtype == np.float16 and weight.size >= 10_000
                and utils._HAS_KMEANS1D and not np.isnan(weight).any()):
            return original(nbits, weight, force_kmeans1d, cluster_dim, vector_axis)
        values, inverse, counts = _fp16_unique(weight)
        n_clusters = min(len(values), 1 << nbits)
        result = utils._kmeans1d.cluster(values, n_clusters, weights=counts)
        lut = np.zeros(1 << nbits)
        lut[:n_clusters] = result.centroids
        return lut, np.array(result.clusters)[inverse]

    passes._get_kmeans_lookup_table_and_weight = lookup
    try:
        yield
    finally:
        passes._get_kmeans_lookup_table_and_weight = original
