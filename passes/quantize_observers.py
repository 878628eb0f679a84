"""Calibration for quantization: checking calibration sets, activation observers, fp32 islands.

* Calibration sets are batched (sample, timestep, text) triples from
  :func:`snapc.calibration.calibration_inputs`; they run through the graph in chunks of the
  graph's own batch size, so the graph being quantized (fusions included) is what is observed.
* Activation observers give a static uint8 range per layer input/output::

      scale = (hi - lo) / 255,   zero_point = round(-lo / scale)

  ``percentile`` clips to the [100-p, p] percentiles of a seeded sample of the values;
  ``mse`` picks the clip of [min, max] (20 shrink factors) with the least quantization MSE.
* fp32 islands: each node runs again with its fp32 inputs cast to fp16; a node whose fp16
  output has Inf/NaN, a relative error above ``tol``, or an fp32 output beyond fp16's range is
  an island, and so is a norm whose squared inputs overflow fp16 (its variance statistics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx

from snapc.errors import SnapcError
from snapc.graph import Graph

__all__ = ["CalibrationError", "calibration_chunks", "quantizable_layers", "kept_float",
           "activation_ranges", "find_fp32_islands", "uint8_params", "OBSERVERS", "FP16_MAX"]

OBSERVERS = ("percentile", "mse")
FP16_MAX = 65504.0
_SAMPLE = 1 << 16  # activation values kept per layer input/output for the observers
_WEIGHTED_OPS = {torch.ops.aten.conv2d.default: "conv", torch.ops.aten.linear.default: "linear"}
_MATMUL_OPS = set(_WEIGHTED_OPS) | {torch.ops.aten.scaled_dot_product_attention.default}
_NORM_OPS = {torch.ops.aten.group_norm.default, torch.ops.aten.layer_norm.default}


class CalibrationError(SnapcError):
    """The calibration set is empty or does not fit the graph's inputs."""


def calibration_chunks(graph: Graph, inputs: Sequence[torch.Tensor] | None
                       ) -> list[tuple[torch.Tensor, ...]]:
    """Return the calibration set split into input tuples of the graph's batch size.

    Raises CalibrationError naming the fix when the set is empty, has the wrong number of
    tensors, or its per-sample shapes or batch size do not fit the graph.
    """
    fix = "make it with snapc.calibration.calibration_inputs(graph, n)"
    expected = graph.example_inputs
    if not inputs or any(t.numel() == 0 for t in inputs):
        raise CalibrationError(f"the calibration set is empty; {fix} with n >= 1")
    if len(inputs) != len(expected):
        raise CalibrationError(f"the calibration set has {len(inputs)} tensors but the graph "
                               f"takes {len(expected)} inputs; {fix}")
    batch, n = expected[0].shape[0], inputs[0].shape[0]
    for name, got, want in zip(graph.input_names, inputs, expected, strict=True):
        if got.shape[1:] != want.shape[1:] or got.shape[0] != n:
            raise CalibrationError(
                f"calibration input '{name}' has shape {tuple(got.shape)} but the graph takes "
                f"(n, {', '.join(map(str, want.shape[1:]))}) with n as for the other inputs; {fix}")
    if n % batch:
        raise CalibrationError(f"the calibration set has {n} samples, not a multiple of the "
                               f"graph's batch size {batch}; {fix} with n a multiple of {batch}")
    return [tuple(t[i: i + batch] for t in inputs) for i in range(0, n, batch)]


def quantizable_layers(gm: fx.GraphModule, root: str = "net", min_elements: int = 0
                       ) -> dict[str, tuple[str, str]]:
    """Return {weight key: (node name, 'conv'|'linear')} for conv2d/linear nodes of ``gm`` whose
    weight is a parameter with at least ``min_elements`` values (keys drop the ``root.`` prefix).

    Raises SnapcError for such a weight outside ``root``: records name weights under the model
    root (a pass adding weights must register them there, as fuse_common.add_weight does).
    """
    layers = {}
    for node in gm.graph.nodes:
        kind = _WEIGHTED_OPS.get(node.target) if node.op == "call_function" else None
        weight = node.args[1] if kind else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            if _attr(gm, weight.target).numel() < min_elements:
                continue
            if root and not weight.target.startswith(f"{root}."):
                raise SnapcError(f"{kind} '{node.name}' reads weight '{weight.target}', which is "
                                 f"not under the model root '{root}'; the pass that added it "
                                 "must register it there (passes.fuse_common.add_weight)")
            layers[weight.target.removeprefix(f"{root}.")] = (node.name, kind)
    return layers


def kept_float(gm: fx.GraphModule, layers: dict[str, tuple[str, str]], root: str = "net"
               ) -> dict[str, Any]:
    """Return what weight quantization leaves in float, by reason: ``small_layers``, conv/linear
    weights not in ``layers`` (under the pass's ``min_elements``: too few bytes to be worth
    their rounding error), ``embeddings``, tables read by a Gather rather than a matmul (token
    and position embeddings), each with its number of values, and ``other``, the count and
    values of the remaining floating-point parameters (norms, biases)."""
    weighted = {}
    tables = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        arg = node.args[0] if node.target == torch.ops.aten.embedding.default else node.args[1]
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            continue
        key = arg.target.removeprefix(f"{root}.")
        if node.target == torch.ops.aten.embedding.default:
            tables[key] = _attr(gm, arg.target).numel()
        elif node.target in _WEIGHTED_OPS and key not in layers:
            weighted[key] = _attr(gm, arg.target).numel()
    prefix = f"{root}." if root else ""
    rest = [t for name, t in gm.state_dict().items() if name.startswith(prefix)
            and t.is_floating_point() and name.removeprefix(prefix) not in
            layers.keys() | weighted.keys() | tables.keys()]
    return {"small_layers": weighted, "embeddings": tables,
            "other": {"tensors": len(rest), "values": sum(t.numel() for t in rest)}}


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


class _Recorder(fx.Interpreter):
    """Runs the graph and hands every node's inputs and output to ``observe``."""

    def __init__(self, gm: fx.GraphModule, observe: Any) -> None:
        super().__init__(gm)
        self.observe = observe

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.observe(n, args, kwargs, out)
        return out


def _sample(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = x.detach().float().reshape(-1)
    if flat.numel() <= _SAMPLE:
        return flat.clone()
    return flat[torch.randint(flat.numel(), (_SAMPLE,), generator=gen)]


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """Return (scale, zero point) of an asymmetric uint8 range covering [lo, hi] and 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(min(255, max(0, round(-lo / scale))))


def _fake_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


def _observe_range(values: torch.Tensor, observer: str, percentile: float) -> tuple[float, float]:
    if observer == "percentile":
        q = torch.quantile(values, torch.tensor([1 - percentile / 100, percentile / 100]))
        return float(q[0]), float(q[1])
    lo, hi = float(values.min()), float(values.max())
    best, best_err = (lo, hi), float("inf")
    for shrink in torch.linspace(0.3, 1.0, 20).tolist():
        scale, zp = uint8_params(lo * shrink, hi * shrink)
        err = float(((_fake_uint8(values, scale, zp) - values) ** 2).mean())
        if err < best_err:
            best, best_err = (lo * shrink, hi * shrink), err
    return best


def activation_ranges(graph: Graph, chunks: Sequence[tuple[torch.Tensor, ...]],
                      layers: dict[str, tuple[str, str]], observer: str = "percentile",
                      percentile: float = 99.99, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Return {weight key: {"input": (scale, zp), "output": (scale, zp) for conv layers}}.

    Observes the input of every layer and the output of conv layers (onnxruntime's QLinearConv
    needs both; linear layers become MatMulIntegerToFloat, which needs only the input).
    """
    if observer not in OBSERVERS:
        raise SnapcError(f"unknown observer '{observer}'; use one of {', '.join(OBSERVERS)}")
    by_node = {node: key for key, (node, _) in layers.items()}
    samples: dict[tuple[str, str], list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)

    def observe(n: fx.Node, args: tuple, kwargs: dict, out: Any) -> None:
        key = by_node.get(n.name)
        if key is None:
            return
        samples.setdefault((key, "input"), []).append(_sample(args[0], gen))
        if layers[key][1] == "conv":
            samples.setdefault((key, "output"), []).append(_sample(out, gen))

    gm = graph.module()
    with torch.no_grad():
        for chunk in chunks:
            _Recorder(gm, observe).run(*chunk)
    ranges: dict[str, dict[str, Any]] = {}
    for (key, where), parts in samples.items():
        lo, hi = _observe_range(torch.cat(parts), observer, percentile)
        ranges.setdefault(key, {})[where] = uint8_params(lo, hi)
    return ranges


def _half(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.half()
    if isinstance(value, (list, tuple)):
        return type(value)(_half(v) for v in value)
    return value


def _island_reason(n: fx.Node, args: tuple, kwargs: dict, out: torch.Tensor, tol: float
                   ) -> str | None:
    if float(out.abs().max()) > FP16_MAX:
        return "fp32 output beyond the fp16 range"
    if n.target in _NORM_OPS and float(args[0].abs().max()) ** 2 > FP16_MAX:
        return "squared inputs of the norm statistics overflow fp16"
    if n.target in _MATMUL_OPS:
        return None  # fp16 matmuls accumulate in fp32 on every target; checked by range above
    half = n.target(*_half(args), **_half(kwargs))
    if not isinstance(half, torch.Tensor):
        return None
    half = half.float()
    if not torch.isfinite(half).all():
        return "Inf/NaN in fp16"
    error = float((half - out).norm() / out.norm().clamp(min=1e-12))
    return f"relative error {error:.3g} in fp16" if error > tol else None


def find_fp32_islands(graph: Graph, chunks: Sequence[tuple[torch.Tensor, ...]],
                      tol: float = 1e-2) -> dict[str, dict[str, str]]:
    """Return {FX node name of graph.module(): {"op": target, "reason": why}} for every node
    that must stay fp32 on any of the calibration chunks (see the module docstring)."""
    islands: dict[str, dict[str, str]] = {}

    def observe(n: fx.Node, args: tuple, kwargs: dict, out: Any) -> None:
        if n.name in islands or not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
            return
        reason = _island_reason(n, args, kwargs, out, tol)
        if reason:
            islands[n.name] = {"op": str(n.target), "reason": reason}

    gm = graph.module()
    with torch.no_grad():
        for chunk in chunks:
            _Recorder(gm, observe).run(*chunk)
    return islands


def iter_layer_weights(gm: fx.GraphModule, layers: dict[str, tuple[str, str]], root: str = "net"
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (weight key, weight tensor of ``gm``) for each layer."""
    for key in layers:
        yield key, _attr(gm, f"{root}.{key}")
