"""A numpy reference interpreter for Core ML MIL programs: verify mlpackages where Core ML
cannot run (Linux).

It executes the ``main`` function of a MIL ``Program`` op by op with the semantics of an fp16
mlprogram: every op computes in float32 and its result is rounded to the dtype the program
declares for it (fp16 for a FLOAT16 conversion), the way Core ML stores fp16 activations.
Weights stay in the dtype the package stores them in (fp16, or palettized / int8 and expanded one
op at a time), and a value is freed after its last use, so an SD-1.5 UNet runs in a few GB.

It covers the ops coremltools emits for diffusers UNets (conv, linear, matmul, norms, softmax,
attention, shape ops, activations) plus the compressed-weight ops of
``coremltools.optimize.coreml`` (``constexpr_lut_to_dense``, ``constexpr_affine_dequantize``,
``constexpr_blockwise_shift_scale``, ``constexpr_cast``). A program holding any other op raises
UnsupportedOpsError listing every one before anything runs.

Hand-written rather than a library: nothing maintained executes MIL off Apple platforms
(coremltools' own runtime is macOS-only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from snapc.errors import UnsupportedOpsError

__all__ = ["run_program", "load_program", "supported_ops", "unsupported_ops", "MAIN"]

MAIN = "main"
Kernel = Callable[[dict[str, Any]], Any]
_KERNELS: dict[str, Kernel] = {}


def _kernel(*names: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for name in names:
            _KERNELS[name] = fn
        return fn

    return register


def _f32(x: Any) -> np.ndarray:
    """Return ``x`` as a float32 array (fp16 storage is widened for compute)."""
    return np.asarray(x, dtype=np.float32)


def _axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


# ---- elementwise -------------------------------------------------------------------------------

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "pow": np.power, "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or,
}


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def run(a: dict[str, Any]) -> np.ndarray:
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            x, y = _f32(x), _f32(y)
        return fn(x, y)

    return run


for _name, _fn in _BINARY.items():
    _KERNELS[_name] = _binary(_fn)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sqrt": np.sqrt, "square": np.square, "exp": np.exp, "sin": np.sin, "cos": np.cos,
    "tanh": np.tanh, "abs": np.abs, "floor": np.floor, "ceil": np.ceil, "round": np.round,
    "sign": np.sign, "erf": erf, "relu": lambda x: np.maximum(x, 0), "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x), "identity": lambda x: x,
}


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    return lambda a: fn(_f32(a["x"]))


for _name, _fn in _UNARY.items():
    _KERNELS[_name] = _unary(_fn)


@_kernel("rsqrt")
def _rsqrt(a: dict[str, Any]) -> np.ndarray:
    return 1.0 / np.sqrt(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-12)))


@_kernel("inverse")
def _inverse(a: dict[str, Any]) -> np.ndarray:
    return 1.0 / (_f32(a["x"]) + np.float32(a.get("epsilon", 1e-4)))


@_kernel("log")
def _log(a: dict[str, Any]) -> np.ndarray:
    return np.log(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-45)))


@_kernel("clip")
def _clip(a: dict[str, Any]) -> np.ndarray:
    return np.clip(_f32(a["x"]), a["alpha"], a["beta"])


@_kernel("gelu")
def _gelu(a: dict[str, Any]) -> np.ndarray:
    x, mode = _f32(a["x"]), a.get("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


@_kernel("cast")
def _cast(a: dict[str, Any]) -> np.ndarray:
    return np.asarray(a["x"])  # the declared output dtype does the conversion


@_kernel("select")
def _select(a: dict[str, Any]) -> np.ndarray:
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


# ---- reductions and normalisation -------------------------------------------------------------

def _reduce(fn: Callable[..., np.ndarray]) -> Kernel:
    def run(a: dict[str, Any]) -> np.ndarray:
        x = _f32(a["x"])
        return fn(x, axis=_axes(a.get("axes"), x.ndim), keepdims=bool(a.get("keep_dims", False)))

    return run


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
                   "reduce_min": np.min}.items():
    _KERNELS[_name] = _reduce(_fn)


def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=axes, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps))


@_kernel("layer_norm")
def _layer_norm(a: dict[str, Any]) -> np.ndarray:
    x = _f32(a["x"])
    axes = _axes(a.get("axes"), x.ndim) or tuple(range(x.ndim))
    out = _normalize(x, axes, a.get("epsilon", 1e-5))
    if a.get("gamma") is not None:
        out = out * _f32(a["gamma"])
    if a.get("beta") is not None:
        out = out + _f32(a["beta"])
    return out


def _per_channel(v: Any, rank: int) -> np.ndarray:
    return _f32(v).reshape((1, -1) + (1,) * (rank - 2))


@_kernel("instance_norm")
def _instance_norm(a: dict[str, Any]) -> np.ndarray:
    x = _f32(a["x"])
    out = _normalize(x, tuple(range(2, x.ndim)), a.get("epsilon", 1e-5))
    return _affine(out, a, x.ndim)


def _affine(out: np.ndarray, a: dict[str, Any], ndim: int) -> np.ndarray:
    """Apply the optional per-channel ``gamma`` scale and ``beta`` shift of a norm op."""
    if a.get("gamma") is not None:
        out = out * _per_channel(a["gamma"], ndim)
    if a.get("beta") is not None:
        out = out + _per_channel(a["beta"], ndim)
    return out


@_kernel("batch_norm")
def _batch_norm(a: dict[str, Any]) -> np.ndarray:
    x = _f32(a["x"])
    scale = 1.0 / np.sqrt(_per_channel(a["variance"], x.ndim) + np.float32(a.get("epsilon", 1e-5)))
    out = (x - _per_channel(a["mean"], x.ndim)) * scale
    return _affine(out, a, x.ndim)


@_kernel("softmax")
def _softmax(a: dict[str, Any]) -> np.ndarray:
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---- linear algebra ---------------------------------------------------------------------------

@_kernel("linear")
def _linear(a: dict[str, Any]) -> np.ndarray:
    out = _f32(a["x"]) @ _f32(a["weight"]).T
    return out if a.get("bias") is None else out + _f32(a["bias"])


@_kernel("matmul")
def _matmul(a: dict[str, Any]) -> np.ndarray:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_kernel("einsum")
def _einsum(a: dict[str, Any]) -> np.ndarray:
    return np.einsum(str(a["equation"]), *(_f32(v) for v in a["values"]), optimize=True)


@_kernel("scaled_dot_product_attention")
def _sdpa(a: dict[str, Any]) -> np.ndarray:
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(np.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f32(mask)
    return np.matmul(_softmax({"x": scores, "axis": -1}), v)


def _conv_pads(a: dict[str, Any], spatial: tuple[int, ...], kernel: tuple[int, ...],
               strides: tuple[int, ...], dil: tuple[int, ...]) -> list[tuple[int, int]]:
    pad_type = a.get("pad_type", "valid")
    if pad_type == "custom":
        pad = [int(p) for p in a["pad"]]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dil, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pads.append((total - small, small) if pad_type == "same_lower" else (small, total - small))
    return pads


@_kernel("conv")
def _conv(a: dict[str, Any]) -> np.ndarray:
    """N-d convolution (1-d and 2-d) as im2col + matmul per group."""
    x, w = _f32(a["x"]), _f32(a["weight"])
    nsp = x.ndim - 2
    if nsp not in (1, 2):
        raise NotImplementedError(f"conv over {nsp} spatial dims")
    strides = tuple(int(s) for s in (a.get("strides") if a.get("strides") is not None
                                     else [1] * nsp))
    dil = tuple(int(d) for d in (a.get("dilations") if a.get("dilations") is not None
                                 else [1] * nsp))
    groups = int(a.get("groups", 1))
    kernel = tuple(w.shape[2:])
    pads = _conv_pads(a, tuple(x.shape[2:]), kernel, strides, dil)
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True))
    win = sliding_window_view(x, extent, axis=tuple(range(2, x.ndim)))
    win = win[(slice(None), slice(None))
              + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dil)]
    cin, cout = w.shape[1], w.shape[0] // groups
    outs = []
    for g in range(groups):
        part = win[:, g * cin:(g + 1) * cin]
        wg = w[g * cout:(g + 1) * cout]
        # (N, C, *out, *k) x (O, C, *k) -> (N, *out, O)
        outs.append(np.tensordot(part, wg, axes=([1] + list(range(2 + nsp, 2 + 2 * nsp)),
                                                 list(range(1, 2 + nsp)))))
    out = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    out = np.moveaxis(out, -1, 1)
    if a.get("bias") is not None:
        out = out + _per_channel(a["bias"], out.ndim)
    return out


# ---- shape and data movement ------------------------------------------------------------------

@_kernel("reshape")
def _reshape(a: dict[str, Any]) -> np.ndarray:
    return np.reshape(a["x"], [int(s) for s in np.atleast_1d(a["shape"])])


@_kernel("transpose")
def _transpose(a: dict[str, Any]) -> np.ndarray:
    return np.transpose(a["x"], [int(p) for p in a["perm"]])


@_kernel("expand_dims")
def _expand_dims(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    rank = x.ndim + len(np.atleast_1d(a["axes"]))
    return np.expand_dims(x, tuple(int(ax) % rank for ax in np.atleast_1d(a["axes"])))


@_kernel("squeeze")
def _squeeze(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    return np.squeeze(x, axis=_axes(a.get("axes"), x.ndim))


@_kernel("concat")
def _concat(a: dict[str, Any]) -> np.ndarray:
    values = [np.asarray(v) for v in a["values"]]
    axis = int(a["axis"])
    if a.get("interleave", False):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@_kernel("split")
def _split(a: dict[str, Any]) -> tuple[np.ndarray, ...]:
    x = np.asarray(a["x"])
    axis = int(a["axis"])
    if a.get("split_sizes") is not None:
        bounds = np.cumsum([int(s) for s in a["split_sizes"]])[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, int(a["num_splits"]), axis=axis))


@_kernel("slice_by_index")
def _slice_by_index(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    rank = x.ndim

    def flags(key: str) -> list[bool]:
        v = a.get(key)
        return [False] * rank if v is None else [bool(f) for f in v]

    begin, end = [int(b) for b in a["begin"]], [int(e) for e in a["end"]]
    stride = [1] * rank if a.get("stride") is None else [int(s) for s in a["stride"]]
    bmask, emask, squeeze = flags("begin_mask"), flags("end_mask"), flags("squeeze_mask")
    index: list[Any] = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i],
                           stride[i]))
    return x[tuple(index)]


@_kernel("slice_by_size")
def _slice_by_size(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                  for b, s in zip(a["begin"], a["size"], strict=True))
    return x[index]


@_kernel("tile")
def _tile(a: dict[str, Any]) -> np.ndarray:
    return np.tile(a["x"], [int(r) for r in a["reps"]])


@_kernel("gather")
def _gather(a: dict[str, Any]) -> np.ndarray:
    return np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0)))


@_kernel("upsample_nearest_neighbor")
def _upsample_nearest(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    sh, sw = float(a.get("scale_factor_height", 1)), float(a.get("scale_factor_width", 1))
    if not (sh.is_integer() and sw.is_integer()):
        rows = (np.arange(int(x.shape[-2] * sh)) / sh).astype(np.int64)
        cols = (np.arange(int(x.shape[-1] * sw)) / sw).astype(np.int64)
        return x[..., rows, :][..., cols]
    return np.repeat(np.repeat(x, int(sh), axis=-2), int(sw), axis=-1)


@_kernel("pad")
def _pad(a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    pad = [int(p) for p in a["pad"]]
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[i], pad[i + 1])
                                                   for i in range(0, len(pad), 2)]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return np.pad(x, pairs, constant_values=a.get("constant_val", 0.0))
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@_kernel("fill")
def _fill(a: dict[str, Any]) -> np.ndarray:
    return np.full([int(s) for s in a["shape"]], a.get("value", 0.0), dtype=np.float32)


# ---- compressed weights (coremltools.optimize.coreml) -----------------------------------------

def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unpack ``count`` unsigned ``nbits``-bit integers stored LSB first (Core ML's layout)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint16)
    return (bits << np.arange(nbits, dtype=np.uint16)).sum(axis=1)


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(a: dict[str, Any]) -> np.ndarray:
    lut, indices = np.asarray(a["lut"]), np.asarray(a["indices"])
    if "shape" in a and a["shape"] is not None:  # iOS16: one LUT, indices packed into bytes
        shape = [int(s) for s in a["shape"]]
        nbits = int(np.log2(lut.shape[0]))
        count = int(np.prod(shape))
        return lut[_unpack_bits(indices, nbits, count)].reshape(shape)
    if lut.shape[-1] != 1:  # iOS18 vector palettization
        raise NotImplementedError("vector palettization (VECTOR_SIZE > 1)")
    # iOS18: lut (*blocks, K, 1); each block of the output has its own table.
    blocks = lut.shape[:-2]
    block = [i // b for i, b in zip(indices.shape, blocks, strict=True)]
    grid = np.meshgrid(*[np.arange(n) // bs for n, bs in zip(indices.shape, block, strict=True)],
                       indexing="ij")
    return lut[(*grid, indices.astype(np.int64), 0)]


@_kernel("constexpr_affine_dequantize")
def _affine_dequantize(a: dict[str, Any]) -> np.ndarray:
    data = np.asarray(a["quantized_data"]).astype(np.float32)
    axis = int(a["axis"]) % data.ndim
    shape = [1] * data.ndim
    shape[axis] = -1

    def per_axis(v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        return v.reshape(shape) if v.ndim else v

    return (data - per_axis(a["zero_point"])) * per_axis(a["scale"])


@_kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a: dict[str, Any]) -> np.ndarray:
    data = np.asarray(a["data"]).astype(np.float32)

    def expand(v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        for axis, (n, m) in enumerate(zip(data.shape, v.shape, strict=True)):
            v = np.repeat(v, n // m, axis=axis)
        return v

    offset = a.get("offset")
    return (data - (0 if offset is None else expand(offset))) * expand(a["scale"])


@_kernel("constexpr_cast")
def _constexpr_cast(a: dict[str, Any]) -> np.ndarray:
    return np.asarray(a["source_val"])


# ---- the interpreter --------------------------------------------------------------------------

def supported_ops() -> list[str]:
    """Return the MIL op types the interpreter can execute (``const`` included)."""
    return sorted([*_KERNELS, "const"])


def unsupported_ops(program: Any, function: str = MAIN) -> list[tuple[str, str]]:
    """Return (op type, op name) for every op of ``function`` the interpreter cannot run."""
    return [(op.op_type, op.name) for op in program.functions[function].operations
            if op.op_type != "const" and op.op_type not in _KERNELS]


def _numpy_dtype(var: Any) -> np.dtype | None:
    from coremltools.converters.mil.mil import types

    try:
        return np.dtype(types.nptype_from_builtin(var.dtype))
    except (TypeError, KeyError, AttributeError):
        return None


def _last_uses(ops: list[Any], outputs: Iterable[Any]) -> dict[str, int]:
    """Return {var name: index of the last op reading it} (len(ops) for block outputs)."""
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                last[var.name] = i
    for var in outputs:
        last[var.name] = len(ops)
    return last


def run_program(
    program: Any,
    inputs: dict[str, np.ndarray],
    function: str = MAIN,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Execute ``function`` of the MIL ``program`` on ``inputs`` and return its outputs by name.

    Inputs are cast to the dtypes the program declares. Each op computes in float32 and its
    result is stored in the op's declared output dtype; values are dropped after their last use.
    Raises UnsupportedOpsError (every unsupported op) before running anything.
    """
    missing = unsupported_ops(program, function)
    if missing:
        raise UnsupportedOpsError("coreml-interpreter", missing)
    block = program.functions[function]
    ops = list(block.operations)
    last = _last_uses(ops, block.outputs)
    env: dict[str, Any] = {}
    for name, var in block.inputs.items():
        if name not in inputs:
            raise ValueError(f"missing input '{name}'; the program takes {list(block.inputs)}")
        dtype = _numpy_dtype(var)
        env[name] = np.asarray(inputs[name], dtype=dtype)

    def value(var: Any) -> Any:
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise KeyError(f"value '{var.name}' used before it was computed")

    for i, op in enumerate(ops):
        if op.op_type != "const":
            args = {k: ([value(v) for v in val] if isinstance(val, (list, tuple)) else value(val))
                    for k, val in op.inputs.items()}
            result = _KERNELS[op.op_type](args)
            results = result if isinstance(result, tuple) else (result,)
            for var, out in zip(op.outputs, results, strict=True):
                dtype = _numpy_dtype(var)
                if var.name in last:  # an output nobody reads is dropped at once
                    env[var.name] = np.asarray(out, dtype=dtype) if dtype is not None else out
            del args, result, results
        for value_in in op.inputs.values():
            for var in value_in if isinstance(value_in, (list, tuple)) else (value_in,):
                if last.get(var.name) == i:
                    env.pop(var.name, None)
        if progress is not None:
            progress(i + 1, len(ops))
    return {var.name: np.asarray(value(var)) for var in block.outputs}


def load_program(package: str | Path) -> Any:
    """Read the MIL Program stored in an ``.mlpackage`` (weights are loaded as stored)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.models.utils import _try_get_weights_dir_path

    spec = ct.utils.load_spec(str(package))
    return load_milproto(spec, spec.specificationVersion,
                         _try_get_weights_dir_path(str(package)))
