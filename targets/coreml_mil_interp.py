"""A numpy reference interpreter for Core ML MIL programs: verify mlpackages where Core ML
cannot run (Linux).

It executes the ``main`` function of a MIL ``Program`` op by op with the semantics of an fp16
mlprogram: every op computes in float32 and its result is rounded to the dtype the program
declares for it (fp16 for a FLOAT16 conversion), the way Core ML stores fp16 activations.
Weights stay in the dtype the package stores them in (fp16, or palettized / int8 and expanded one
op at a time), and a value is freed after its last use, so an SD-1.5 UNet runs in a few GB.

Speed (an SD-1.5 UNet is run once or twice per compile): an fp16 value is held as the float32
array of its exact fp16 values (rounded to nearest, ties to even, by float32 arithmetic,
``_round_half``; bit for bit what ``astype(float16)`` gives, without numpy's slow path for
values in the fp16 subnormal range), so no op widens its inputs again; fp16 weights are widened
through a 65,536-entry table. Attention (``matmul -> softmax -> matmul`` whose intermediate values
have no other reader) runs fused, in blocks of rows, so the score matrix is never materialised;
``matmul`` always computes in the same row blocks, so fused and unfused runs give identical bits
(a chunked program may cut between the three ops). Heads, row blocks of conv / linear products
and im2col copies run on a pool of one thread per core while numpy's OpenBLAS is held to one
thread (its own thread hand-off costs more than small blocks take); how work is split depends
on shapes only, so the bits do not depend on the core count.

It covers the ops coremltools emits for diffusers UNets (conv, linear, matmul, norms, softmax,
attention, shape ops, activations) plus the compressed-weight ops of
``coremltools.optimize.coreml`` (``constexpr_lut_to_dense``, ``constexpr_affine_dequantize``,
``constexpr_blockwise_shift_scale``, ``constexpr_cast``). A program holding any other op raises
UnsupportedOpsError listing every one before anything runs.

Hand-written rather than a library: nothing maintained executes MIL off Apple platforms
(coremltools' own runtime is macOS-only).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
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


_HALF_TABLE: list[np.ndarray] = []  # the float32 value of every fp16 bit pattern, built once


def _f32(x: Any) -> np.ndarray:
    """Return ``x`` as a float32 array (fp16 storage is widened for compute, exactly)."""
    if isinstance(x, np.ndarray) and x.dtype == np.float16 and x.ndim:
        if not _HALF_TABLE:
            bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
            _HALF_TABLE.append(bits.view(np.float16).astype(np.float32))
        return _HALF_TABLE[0][x.view(np.uint16)]  # a table look-up: 2x numpy's fp16 cast
    return np.asarray(x, dtype=np.float32)


_EXPONENT = np.uint32(0x7F800000)
_HALF_MIN_EXPONENT = np.uint32(113 << 23)  # 2**-14: below it fp16 is subnormal, on a 2**-24 grid
_HALF_SHIFT = np.uint32(13 << 23)  # x 2**13: fp16 keeps 10 of float32's 23 fraction bits
_HALF_LIMIT = 65520.0  # fp16 rounds from here on to infinity
_BLOCK = 1 << 16  # elements per step of the in-place loops (stays in cache)
_ROW_ELEMENTS = 1 << 18  # output elements per BLAS call of a matmul (see _row_block)
_WORKERS = max(1, min(os.cpu_count() or 1, 8))  # threads for independent matrices and blocks
_POOL: list[ThreadPoolExecutor] = []
_THREADS = "mil-interp"


def _parallel(fn: Callable[[Any], None], items: list[Any]) -> None:
    """Call ``fn`` on every item, on up to _WORKERS threads (numpy and BLAS release the GIL).

    Each item's work is the same whatever the thread count, so results do not depend on it.
    """
    if _WORKERS < 2 or len(items) < 2 or threading.current_thread().name.startswith(_THREADS):
        for item in items:  # (inside a worker, nested work runs in that worker)
            fn(item)
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_WORKERS, thread_name_prefix=_THREADS))
    for future in [_POOL[0].submit(fn, item) for item in items]:
        future.result()


def _round_half(x: np.ndarray, nonnegative: bool = False) -> np.ndarray:
    """Round the float32 array ``x`` to fp16 values (nearest, ties to even) and return it: in
    place when ``x`` is C-contiguous, else in a contiguous copy.

    Adding and subtracting ``c = 2**(e + 13)`` (``e`` the exponent of ``|x|``, at least -14)
    rounds ``|x|`` to a multiple of its fp16 ulp in one float32 rounding; the sign goes back
    with copysign (so -0.0 stays). Equal bit for bit to ``x.astype(float16)`` widened back
    (tests check every case); values out of fp16's finite range take numpy's cast.
    ``nonnegative``: the caller knows ``x >= 0`` (softmax): two passes fewer.
    """
    if not x.size:
        return x
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    if not (x.max() < _HALF_LIMIT and x.min() > -_HALF_LIMIT):  # also false for NaN
        with np.errstate(over="ignore", invalid="ignore"):
            x[...] = x.astype(np.float16)
        return x
    flat = x.reshape(-1)
    size = min(flat.size, _BLOCK)
    mag, step = np.empty(size, np.float32), np.empty(size, np.uint32)
    for start in range(0, flat.size, _BLOCK):
        part = flat[start:start + _BLOCK]
        m, c = (part if nonnegative else mag[:part.size]), step[:part.size]
        if not nonnegative:
            np.abs(part, out=m)
        np.bitwise_and(m.view(np.uint32), _EXPONENT, out=c)
        np.maximum(c, _HALF_MIN_EXPONENT, out=c)
        c += _HALF_SHIFT
        m += c.view(np.float32)
        m -= c.view(np.float32)
        if not nonnegative:
            np.copysign(m, part, out=part)
    return x


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
    e = np.subtract(x, x.max(axis=axis, keepdims=True))  # the fused attention's steps, in order
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


# ---- linear algebra ---------------------------------------------------------------------------

@_kernel("linear")
def _linear(a: dict[str, Any]) -> np.ndarray:
    x, w = _f32(a["x"]), _f32(a["weight"])
    if x.ndim < 2:
        out = x @ w.T
        return out if a.get("bias") is None else out + _f32(a["bias"])
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty((flat.shape[0], w.shape[0]), np.float32)
    _gemm_rows(flat, w.T, out, _quarter(flat.shape[0]))
    if a.get("bias") is not None:
        out += _f32(a["bias"])
    return out.reshape(x.shape[:-1] + (w.shape[0],))


def _matmul_operands(a: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return x, y


def _row_block(inner: int, cols: int) -> int:
    """Rows of ``x`` per BLAS call of ``x @ y`` (``inner`` = x's columns, ``cols`` = y's).

    BLAS rounds differently for different row counts, so plain and fused matmuls both use
    this block: a chain cut between the ops of an attention gives the whole program's bits.
    """
    return max(8, _ROW_ELEMENTS // max(inner, cols, 1))


def _quarter(rows: int) -> int:
    """Rows per BLAS call of a big 2-d product (conv, linear): a quarter, 8-aligned, so that
    up to four workers share it (a function of the shape alone: same bits on any machine)."""
    return max(8, -(-rows // 32) * 8)


def _batched(*arrays: np.ndarray) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Return (broadcast batch shape, the arrays broadcast to it) of stacks of matrices."""
    batch = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    return batch, [np.broadcast_to(a, batch + a.shape[-2:]) for a in arrays]


@_kernel("matmul")
def _matmul(a: dict[str, Any]) -> np.ndarray:
    x, y = _matmul_operands(a)
    if x.ndim < 2 or y.ndim < 2:
        return np.matmul(x, y)
    batch, (xb, yb) = _batched(x, y)
    out = np.empty(batch + (x.shape[-2], y.shape[-1]), np.float32)
    rows = _row_block(x.shape[-1], y.shape[-1])
    _parallel(lambda idx: _gemm_rows(xb[idx], yb[idx], out[idx], rows), list(np.ndindex(batch)))
    return out


def _attention(first: dict[str, Any], second: dict[str, Any], round_scores: bool,
               round_probs: bool) -> np.ndarray:
    """``softmax(x @ y, axis=-1) @ v`` as the three ops compute it (each rounded to fp16 when
    declared so), one block of rows at a time: the scores never exist whole."""
    x, y = _matmul_operands(first)
    _, v = _matmul_operands({"x": None, "y": second["y"],
                             "transpose_y": second.get("transpose_y", False)})
    batch, (xb, yb, vb) = _batched(x, y, v)
    out = np.empty(batch + (x.shape[-2], v.shape[-1]), np.float32)
    rows = _row_block(x.shape[-1], y.shape[-1])

    def matrix(idx: tuple[int, ...]) -> None:
        xm, ym, vm, om = xb[idx], yb[idx], vb[idx], out[idx]
        scores = np.empty((min(rows, xm.shape[0]), ym.shape[-1]), np.float32)
        for r in range(0, xm.shape[0], rows):
            s = scores[:min(rows, xm.shape[0] - r)]
            np.matmul(xm[r:r + rows], ym, out=s)
            if round_scores:
                _round_half(s)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            if round_probs:
                _round_half(s, nonnegative=True)
            np.matmul(s, vm, out=om[r:r + rows])

    _parallel(matrix, list(np.ndindex(batch)))
    return out


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


def _gemm_rows(left: np.ndarray, right: np.ndarray, out: np.ndarray, rows: int) -> None:
    """``out = left @ right`` (2-d), ``rows`` rows of ``left`` per BLAS call, on the workers."""
    def block(r: int) -> None:
        np.matmul(left[r:r + rows], right, out=out[r:r + rows])

    _parallel(block, list(range(0, left.shape[0], rows)))


def _im2col(part: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
            dil: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Return the (C * kh * kw, oh * ow) patch matrix of the padded image ``part`` (C, H, W):
    one strided copy per kernel offset, on the workers."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, strides, dil, size
    patches = np.empty((part.shape[0], kh, kw, oh, ow), np.float32)

    def offset(ij: tuple[int, int]) -> None:
        i, j = ij
        patches[:, i, j] = part[:, i * dh:i * dh + (oh - 1) * sh + 1:sh,
                                j * dw:j * dw + (ow - 1) * sw + 1:sw]

    _parallel(offset, [(i, j) for i in range(kh) for j in range(kw)])
    return patches.reshape(-1, oh * ow)


@_kernel("conv")
def _conv(a: dict[str, Any]) -> np.ndarray:
    """1-d and 2-d convolution: per image and group, the weights (O, C*k) times the im2col
    matrix (C*k, positions), made by one strided copy per kernel offset (none for a
    pointwise conv), in blocks of output channels on the worker threads."""
    x, w = _f32(a["x"]), _f32(a["weight"])
    nsp = x.ndim - 2
    if nsp not in (1, 2):
        raise NotImplementedError(f"conv over {nsp} spatial dims")
    strides = tuple(int(s) for s in (a.get("strides") if a.get("strides") is not None
                                     else [1] * nsp))
    dil = tuple(int(d) for d in (a.get("dilations") if a.get("dilations") is not None
                                 else [1] * nsp))
    groups = int(a.get("groups", 1))
    pads = _conv_pads(a, tuple(x.shape[2:]), tuple(w.shape[2:]), strides, dil)
    if nsp == 1:  # as 2-d with height 1
        x, w = x[:, :, None], w[:, :, None]
        strides, dil, pads = (1, *strides), (1, *dil), [(0, 0), *pads]
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    (kh, kw), (sh, sw), (dh, dw) = w.shape[2:], strides, dil
    oh, ow = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1, (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    n_img, cin, cout = x.shape[0], w.shape[1], w.shape[0] // groups
    weights = w.reshape(w.shape[0], -1)
    out = np.empty((n_img, w.shape[0], oh * ow), np.float32)
    rows = _quarter(cout)
    for n in range(n_img):
        for g in range(groups):
            part = x[n, g * cin:(g + 1) * cin]
            cols = (part.reshape(cin, oh * ow) if kh == kw == sh == sw == 1
                    else _im2col(part, (kh, kw), (sh, sw), (dh, dw), (oh, ow)))
            _gemm_rows(weights[g * cout:(g + 1) * cout], cols, out[n, g * cout:(g + 1) * cout],
                       rows)
    out = out.reshape((n_img, w.shape[0], oh, ow) if nsp == 2 else (n_img, w.shape[0], ow))
    if a.get("bias") is not None:
        out += _per_channel(a["bias"], out.ndim)
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
    """Unpack ``count`` unsigned ``nbits``-bit integers stored LSB first (Core ML's layout).

    Whole groups at once: ``nbits / gcd(nbits, 8)`` bytes hold ``8 / gcd(nbits, 8)`` indices
    (3 bytes hold 4 six-bit ones), read as one integer and shifted out index by index.
    """
    group_bytes, per_group = nbits // math.gcd(nbits, 8), 8 // math.gcd(nbits, 8)
    groups = -(-count // per_group)
    data = np.zeros(groups * group_bytes, np.uint8)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)[:data.size]
    data[:packed.size] = packed
    data = data.reshape(groups, group_bytes)
    words = np.zeros(groups, np.uint64)
    for j in range(group_bytes):
        words |= data[:, j].astype(np.uint64) << np.uint64(8 * j)
    out = np.empty((groups, per_group), np.uint16)
    for i in range(per_group):
        out[:, i] = (words >> np.uint64(nbits * i)) & np.uint64((1 << nbits) - 1)
    return out.reshape(-1)[:count]


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(a: dict[str, Any]) -> np.ndarray:
    lut, indices = np.asarray(a["lut"]), np.asarray(a["indices"])
    if "shape" in a and a["shape"] is not None:  # iOS16: one LUT, indices packed into bytes
        shape = [int(s) for s in a["shape"]]
        nbits = int(np.log2(lut.shape[0]))
        count = int(np.prod(shape))
        return _f32(lut)[_unpack_bits(indices, nbits, count)].reshape(shape)
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


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS on one thread inside the block (restored after; threadpoolctl).

    The interpreter makes thousands of small BLAS calls (row blocks of attention, per-group
    convolutions); OpenBLAS's thread hand-off costs ~15 ms a call on a loaded machine, far more
    than the call itself (measured: a 16x20 @ 20x4096 block takes 15 ms on two threads, 0.2 ms
    on one).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _numpy_dtype(var: Any) -> np.dtype | None:
    from coremltools.converters.mil.mil import types

    try:
        return np.dtype(types.nptype_from_builtin(var.dtype))
    except (TypeError, KeyError, AttributeError):
        return None


def _last_uses(ops: list[Any], outputs: Iterable[Any],
               at: dict[int, int] | None = None) -> dict[str, int]:
    """Return {var name: index of the last op reading it} (len(ops) for block outputs).

    ``at`` moves the reads of an op to another index (the ops of a fused chain read their
    inputs when the chain runs, at its last op).
    """
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                last[var.name] = max(last.get(var.name, -1), (at or {}).get(i, i))
    for var in outputs:
        last[var.name] = len(ops)
    return last


# Ops that only move, pick or repeat values: an fp16 result of fp16 values needs no rounding.
_MOVES = frozenset({"reshape", "transpose", "expand_dims", "squeeze", "concat", "split",
                    "slice_by_index", "slice_by_size", "tile", "gather", "select",
                    "upsample_nearest_neighbor", "identity", "constexpr_lut_to_dense"})


def _static(var: Any) -> bool:
    return var.shape is not None and all(isinstance(d, (int, np.integer)) for d in var.shape)


def _flag(op: Any, name: str) -> bool:
    var = op.inputs.get(name)
    return bool(var.val) if var is not None and var.val is not None else False


def _attention_chains(ops: list[Any], pinned: set[str]) -> dict[int, tuple[Any, Any, Any]]:
    """Return {index of the last op: (matmul, softmax, matmul)} for each attention that can run
    fused: scores and probabilities read by nothing else (nor in ``pinned``), softmax over the
    last axis, static shapes, one batch shape, and the same row block for both matmuls."""
    index = {id(op): i for i, op in enumerate(ops)}
    chains = {}
    for soft in ops:
        if soft.op_type != "softmax":
            continue
        scores, probs = soft.inputs["x"], soft.outputs[0]
        first = scores.op
        if (first is None or first.op_type != "matmul" or len(probs.child_ops) != 1
                or len(scores.child_ops) != 1 or {scores.name, probs.name} & pinned):
            continue
        second = probs.child_ops[0]
        if (second.op_type != "matmul" or second.inputs["x"] is not probs
                or second.inputs["y"] is probs or _flag(second, "transpose_x")):
            continue
        axis = soft.inputs.get("axis")
        rank = len(scores.shape)
        if (axis is None or axis.val is None or int(axis.val) % rank != rank - 1 or rank < 2
                or not all(_static(v) for v in (first.inputs["x"], first.inputs["y"],
                                                second.inputs["y"], scores))):
            continue
        value = second.inputs["y"].shape
        rows_v = value[-1] if not _flag(second, "transpose_y") else value[-2]
        inner = first.inputs["x"].shape[-2 if _flag(first, "transpose_x") else -1]
        batches = {tuple(v.shape[:-2]) for v in (first.inputs["x"], first.inputs["y"],
                                                 second.inputs["y"], scores)}
        if (len(batches) != 1 or len(first.inputs["x"].shape) < 2
                or _row_block(inner, scores.shape[-1]) != _row_block(scores.shape[-1], rows_v)):
            continue
        chains[index[id(second)]] = (first, soft, second)
    return chains


def _owned(out: Any, args: dict[str, Any]) -> bool:
    """Whether ``out`` is a new float32 array the kernel made (safe to round in place)."""
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.owndata
            and out.flags.writeable):
        return False
    return not any(out is v or (isinstance(v, list) and any(out is w for w in v))
                   for v in args.values())


def _stored(out: Any, var: Any, op_type: str, args: dict[str, Any]) -> Any:
    """Return ``out`` as the interpreter holds ``var``: fp16 values as exact float32."""
    dtype = _numpy_dtype(var)
    if dtype is None:
        return out
    if dtype != np.float16:
        return np.asarray(out, dtype=dtype)
    if op_type in _MOVES or (isinstance(out, np.ndarray) and out.dtype == np.float16):
        return _f32(out)  # fp16 values already
    if not _owned(out, args):
        out = np.array(out, dtype=np.float32)
    return _round_half(out)


def run_program(
    program: Any,
    inputs: dict[str, np.ndarray],
    function: str = MAIN,
    progress: Callable[[int, int], None] | None = None,
    keep: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Execute ``function`` of the MIL ``program`` on ``inputs`` and return its outputs by name,
    plus the values named in ``keep`` (e.g. the boundaries of chunks), all in declared dtypes.

    Inputs are cast to the dtypes the program declares. Each op computes in float32 and its
    result is stored in the op's declared output dtype; values are dropped after their last use.
    Raises UnsupportedOpsError (every unsupported op) before running anything, ValueError for a
    missing input or a ``keep`` name the function does not compute.
    """
    missing = unsupported_ops(program, function)
    if missing:
        raise UnsupportedOpsError("coreml-interpreter", missing)
    block = program.functions[function]
    ops = list(block.operations)
    declared = {**{var.name: var for op in ops for var in op.outputs}, **block.inputs}
    keep = list(dict.fromkeys(keep))
    unknown = [name for name in keep if name not in declared]
    if unknown:
        raise ValueError(f"cannot keep {unknown}: no value of function '{function}' has that name")
    for name in block.inputs:
        if name not in inputs:
            raise ValueError(f"missing input '{name}'; the program takes {list(block.inputs)}")
    run = _Run(ops, [v.name for v in block.outputs], keep)
    for name, var in block.inputs.items():
        run.env[name] = _stored(np.asarray(inputs[name], dtype=_numpy_dtype(var)), var,
                                "identity", {})
    with _one_blas_thread():
        for i, op in enumerate(ops):
            run.step(i, op)
            if progress is not None:
                progress(i + 1, len(ops))
    names = list(dict.fromkeys([var.name for var in block.outputs] + keep))
    return {name: _declared(run.value(declared[name]), declared[name]) for name in names}


class _Run:
    """The values of one run: computed ones by name, each dropped after its last reader."""

    def __init__(self, ops: list[Any], outputs: list[str], keep: list[str]) -> None:
        self.chains = _attention_chains(ops, set(outputs) | set(keep))
        index = {id(op): i for i, op in enumerate(ops)}
        # the first two ops of a fused attention run with its last one (and read then)
        self.fused = {index[id(op)]: end for end, chain in self.chains.items()
                      for op in chain[:2]}
        self.last = _last_uses(ops, (), at=self.fused)
        self.last.update({name: len(ops) for name in [*outputs, *keep]})
        self.env: dict[str, Any] = {}

    def value(self, var: Any) -> Any:
        if var.name in self.env:
            return self.env[var.name]
        if var.val is not None:
            return var.val
        raise KeyError(f"value '{var.name}' used before it was computed")

    def arguments(self, op: Any, skip: str = "") -> dict[str, Any]:
        return {k: ([self.value(v) for v in val] if isinstance(val, (list, tuple))
                    else self.value(val)) for k, val in op.inputs.items() if k != skip}

    def step(self, i: int, op: Any) -> None:
        """Run op ``i`` (a fused attention at its last op), then drop what nobody reads later."""
        if op.op_type != "const" and i not in self.fused:
            if i in self.chains:  # x of the last matmul, the probabilities, is made in blocks
                first, soft, _ = self.chains[i]
                args, first_args = self.arguments(op, skip="x"), self.arguments(first)
                result = _attention(first_args, args,
                                    _numpy_dtype(first.outputs[0]) == np.float16,
                                    _numpy_dtype(soft.outputs[0]) == np.float16)
                args = {**args, **{f"first.{k}": v for k, v in first_args.items()}}
            else:
                args = self.arguments(op)
                result = _KERNELS[op.op_type](args)
            results = result if isinstance(result, tuple) else (result,)
            for var, out in zip(op.outputs, results, strict=True):
                if var.name in self.last:  # an output nobody reads is dropped at once
                    self.env[var.name] = _stored(out, var, op.op_type, args)
            del args, result, results
        for read in [op, *self.chains.get(i, ())[:2]]:
            for value in read.inputs.values():
                for var in value if isinstance(value, (list, tuple)) else (value,):
                    if self.last.get(var.name) == i:
                        self.env.pop(var.name, None)


def _declared(value: Any, var: Any) -> np.ndarray:
    """Return a held value in its declared dtype (fp16 values are exact: a lossless cast)."""
    dtype = _numpy_dtype(var)
    return np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)


def load_program(package: str | Path) -> Any:
    """Read the MIL Program stored in an ``.mlpackage`` (weights are loaded as stored)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.models.utils import _try_get_weights_dir_path

    spec = ct.utils.load_spec(str(package))
    return load_milproto(spec, spec.specificationVersion,
                         _try_get_weights_dir_path(str(package)))
