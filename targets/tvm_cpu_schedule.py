"""Default schedules for CPU (``llvm``) kernels, so an untuned x86 or Arm build is not a serial
loop nest.

TVM 0.27's CPU Relax pipeline (``relax.backend.cpu_generic``) applies no schedule at all: every
kernel compiles as the naive loop nest that legalization wrote (one thread, the reduction loops
innermost, padding as a branch per element). dlight has two CPU rules (``GEMV``, and
``Reduction`` for softmax / norms), but nothing for convolutions, matmuls or plain elementwise
kernels, and its ``Reduction`` rule, which also matches "contraction + epilogue" kernels, leaves
a convolution slower than the naive nest. These rules fill that gap in dlight's own framework
(``ApplyDefaultSchedule`` runs them in order; the first that returns a schedule wins; kernels
that a tuning database scheduled are left alone):

- :class:`Contraction`, for kernels holding a convolution or matmul (a ``S...S R...R`` block
  whose innermost spatial axis is contiguous in its output and in one operand): a register tile
  of ``rows x lanes`` accumulators (a ``local`` cache the LLVM backend keeps in vector
  registers; up to 8 rows with AVX-512's 32 registers, else 4), the reduction loops outside
  the tile, every outer spatial loop fused into one parallel loop; the tile's loops unrolled
  (``vectorize`` refuses a loop under reduction loops; LLVM's SLP vectorizer turns the
  unrolled lanes into vector FMAs).
- :class:`VectorReduction`, for kernels holding a row reduction (softmax, LayerNorm, GroupNorm:
  a reduction whose reduced operands are indexed by every output iterator, innermost axis
  contiguous): the innermost reduction loop is split by the vector width and ``rfactor``-ed
  into that many partial results, kept in registers under the parallel loop, summed at the
  end. dlight's ``Reduction`` rule leaves one serial add chain per output (LLVM may not
  reorder float adds), and recomputes a GroupNorm's statistics once per channel of a group.
- :class:`Elementwise`, the fallback: each block's spatial loops fused, parallel, the innermost
  part vectorized; other reductions parallel over their spatial loops.

All three inline injective producers into their consumers first, except paddings (materialized, so
the contraction's inner loop reads contiguous memory without a branch). Schedules keep the
computation (the contractions keep each output's reduction order; the vector reductions
add in ``width`` interleaved partial sums, as onnxruntime's and PyTorch's vector kernels do):
the artifacts still verify against PyTorch as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

__all__ = ["Contraction", "VectorReduction", "Elementwise", "cpu_rules"]

ROW_TILES = (4, 2)  # accumulator rows per register tile (x lanes columns)
# With AVX-512 (32 vector registers) a tile at most two vectors wide takes up to 8 rows: 16
# accumulators, where 4 rows left the 8x8 and 16x16 convolutions of shapes at 115-205
# GFLOP/s (180-280 with 8 rows; per-kernel timing on a Zen 5, bench/RESULTS.md "TVM x86").
WIDE_ROW_TILES = (8, 4, 2)


def _lanes(target: Target) -> int:
    """fp32 lanes of one vector register of ``target`` (128-bit when LLVM does not say).

    x86 by its CPU features: ``llvm_get_vector_width`` answers with this host's width for
    any x86 target, so a generic x86-64 (SSE2) build made on an AVX-512 machine would be
    tiled for 16 lanes."""
    if target_has_features("sse2", target):
        bits = 512 if target_has_features("avx512f", target) else (
            256 if target_has_features("avx", target) else 128)
    else:
        bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // 32, 4)


def _divisor(extent: Any, choices: tuple[int, ...]) -> int | None:
    """Return the first of ``choices`` (>= 2) that divides a static ``extent``."""
    if not isinstance(extent, int):
        return None
    return next((f for f in choices if 2 <= f <= extent and extent % f == 0), None)


def _vars(expr: Any) -> set:
    return set(collect_vars_used_in_prim_expr(expr))


def _region_vars(region: Any) -> set:
    """The variables a buffer region's indices use."""
    return set().union(*(_vars(d.min) for d in region.region))


def _inline_producers(sch: s_tir.Schedule) -> list[SBlockInfo] | None:
    """Inline every injective non-padding block but the last; return the blocks left."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    for info in infos[:-1]:
        if info.is_injective() and not info.is_data_pad(sch):
            try:
                sch.compute_inline(info.block_rv)
            except ScheduleError:  # not inlinable here: it is scheduled on its own
                pass
    return normalize_prim_func(sch)


def _split_kinds(info: SBlockInfo, sch: s_tir.Schedule) -> tuple[list, int] | None:
    """Return (loops, number of leading spatial loops) of a ``S...S R...R`` block whose loops
    match its iterators one to one, else None."""
    kinds = info.dom_kind()
    loops = sch.get_loops(info.block_rv)
    if not loops or len(loops) != len(kinds):
        return None
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s == 0 or kinds[n_s:].strip("R"):
        return None
    return list(loops), n_s


def _contraction_axes(sch: s_tir.Schedule, info: SBlockInfo, loops: list, n_s: int,
                      lanes: int) -> tuple[int, int | None] | None:
    """For a contraction block: (vector width, row-tile iterator index or None), else None.

    A contraction has reduction loops, its innermost spatial iterator indexes the last
    dimension of its output and of one operand (the contiguous operand), and that loop's
    extent is a multiple of a vector width. The row tile is the innermost other spatial
    iterator the contiguous operand does not use, so each operand load feeds every row.
    """
    if n_s == len(loops) or n_s < 2:
        return None
    block = sch.get(info.block_rv)
    iters = [iv.var for iv in block.iter_vars]
    vec = iters[n_s - 1]
    out = block.writes[0]
    if not out.region or vec not in _vars(out.region[-1].min):
        return None
    operands = [r for r in block.reads if not r.source.same_as(out.source)]
    contiguous = [r for r in operands if r.region and vec in _vars(r.region[-1].min)]
    width = _divisor(get_extent(sch, loops[n_s - 1]), (4 * lanes, 2 * lanes, lanes, lanes // 2, 4))
    if not contiguous or width is None:
        return None
    used = set().union(*(_region_vars(r) for r in contiguous))
    row = next((i for i in reversed(range(n_s - 1)) if iters[i] not in used), None)
    return width, row


def _schedule_injective(sch: s_tir.Schedule, loops: list, lanes: int) -> None:
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    width = _divisor(get_extent(sch, fused), (2 * lanes, lanes, lanes // 2, 4))
    if width is None:
        sch.parallel(fused)
        return
    outer, inner = sch.split(fused, factors=[None, width])
    sch.parallel(outer)
    sch.vectorize(inner)


def _reduction_width(sch: s_tir.Schedule, info: SBlockInfo, loops: list, n_s: int,
                     lanes: int) -> int | None:
    """Vector width for a reduction block's partial sums, else None: its innermost reduction
    iterator must index the last (contiguous) dimension of a buffer it reads, every buffer it
    reduces over must be indexed by every spatial iterator (a row reduction such as a norm
    or softmax sum; a matmul's operands each miss one), and a vector width must divide the
    innermost loop's extent."""
    if n_s == len(loops):
        return None
    block = sch.get(info.block_rv)
    spatial = {iv.var for iv in block.iter_vars[:n_s]}
    inner = block.iter_vars[-1].var
    reduced = [(r, used) for r in block.reads if inner in (used := _region_vars(r))]
    if any(not spatial <= used for _, used in reduced):
        return None
    if not any(r.region and inner in _vars(r.region[-1].min) for r, _ in reduced):
        return None
    return _divisor(get_extent(sch, loops[-1]), (lanes, lanes // 2, 4))


def _schedule_reduction(sch: s_tir.Schedule, info: SBlockInfo, loops: list, n_s: int,
                        lanes: int) -> None:
    """Parallel over the spatial loops; where :func:`_reduction_width` allows, ``width``
    partial results per output (``rfactor`` of the innermost reduction loop, kept in
    registers) so the inner loop is vector adds instead of one serial chain per output."""
    outer = sch.fuse(*loops[:n_s]) if n_s > 1 else loops[0]
    sch.parallel(outer)
    width = _reduction_width(sch, info, loops, n_s, lanes)
    if width is None:
        return
    _, lane = sch.split(loops[-1], factors=[None, width])
    try:
        partial = sch.rfactor(lane, 0)
    except ScheduleError:  # a reducer rfactor does not know: keep the serial chain
        return
    inner = sch.get_loops(partial)
    # The final sum over the lanes under the same parallel loop: the partials then live in
    # one thread's registers, not in a buffer shared across the loop.
    sch.reverse_compute_at(info.block_rv, inner[0])
    init = sch.decompose_reduction(partial, inner[1])
    sch.unroll(inner[-1])  # the lanes: LLVM's SLP vectorizer makes them one vector add
    sch.vectorize(sch.get_loops(init)[-1])
    for index in range(len(sch.get(partial).writes)):
        sch.set_scope(partial, index, "local")


def _row_tiles(avx512: bool, width: int, lanes: int) -> tuple[int, ...]:
    """Row counts to try for a register tile ``width`` fp32 columns wide: WIDE_ROW_TILES
    needs AVX-512's 32 vector registers, asked by feature (``lanes`` cannot tell them)."""
    return WIDE_ROW_TILES if avx512 and width <= 2 * lanes else ROW_TILES


def _schedule_contraction(sch: s_tir.Schedule, info: SBlockInfo, loops: list, n_s: int,
                          row_tiles: tuple[int, ...], width: int, row: int | None) -> None:
    spatial, reduction = loops[:n_s], loops[n_s:]
    col_outer, col = sch.split(spatial[-1], factors=[None, width])
    outer, tile = list(spatial[:-1]), [col]
    rows = _divisor(get_extent(sch, spatial[row]), row_tiles) if row is not None else None
    if rows is not None:
        outer[row], row_inner = sch.split(spatial[row], factors=[None, rows])
        tile = [row_inner, col]
    sch.reorder(*outer, col_outer, *reduction, *tile)
    parallel = sch.fuse(*outer, col_outer)
    sch.parallel(parallel)
    accumulators = sch.cache_write(info.block_rv, 0, "local")
    sch.reverse_compute_at(accumulators, parallel, preserve_unit_loops=True)
    init = sch.decompose_reduction(info.block_rv, reduction[0])
    for loop in tile:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(accumulators)[-1])


def _any_block(sch: s_tir.Schedule, test: Callable[..., Any]) -> bool:
    """Whether ``test(sch, info, loops, n_s)`` holds for a ``S...S R...R`` block of ``sch``."""
    for info in normalize_prim_func(sch) or []:
        split = _split_kinds(info, sch)
        if split is not None and test(sch, info, *split):
            return True
    return False


class _BlockwiseRule(CPUScheduleRule):
    """Inline producers, then schedule every remaining block on its own."""

    tile_contractions = True  # False: reductions are never register-tiled as contractions

    def _applies(self, sch: s_tir.Schedule, lanes: int) -> bool:
        """Whether this rule takes the kernel (every kernel, unless a subclass narrows it)."""
        return True

    def apply(self, func: tirx.PrimFunc, target: Target,
              _tunable: bool) -> s_tir.Schedule | None:
        """Return the scheduled ``func``, or None where this rule does not apply."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        lanes = _lanes(target)
        if not self._applies(sch, lanes):
            return None
        avx512 = target_has_features("avx512f", target)
        infos = _inline_producers(sch)
        if infos is None:
            return None
        for info in infos:
            split = _split_kinds(info, sch)
            if split is None:
                continue
            loops, n_s = split
            if n_s == len(loops):
                _schedule_injective(sch, loops, lanes)
                continue
            axes = (_contraction_axes(sch, info, loops, n_s, lanes)
                    if self.tile_contractions else None)
            if axes is None:
                _schedule_reduction(sch, info, loops, n_s, lanes)
            else:
                _schedule_contraction(sch, info, loops, n_s,
                                      _row_tiles(avx512, axes[0], lanes), *axes)
        return sch


class Contraction(_BlockwiseRule):
    """Kernels holding a convolution or matmul: register-tiled, parallel (module docstring)."""

    def _applies(self, sch: s_tir.Schedule, lanes: int) -> bool:
        return _any_block(sch, lambda *block: _contraction_axes(*block, lanes) is not None)


class VectorReduction(_BlockwiseRule):
    """Kernels holding a reduction over a contiguous axis (softmax, GroupNorm, LayerNorm):
    partial results in vector registers (module docstring). Its reductions are not
    contractions (a variance reads the mean it subtracts, which would pass for an operand)."""

    tile_contractions = False

    def _applies(self, sch: s_tir.Schedule, lanes: int) -> bool:
        return _any_block(sch, lambda *block: _reduction_width(*block, lanes) is not None)


class Elementwise(_BlockwiseRule):
    """Every other kernel: parallel and vectorized block by block (module docstring)."""


def cpu_rules() -> list[CPUScheduleRule]:
    """The ordered rules of snapc's default CPU schedule: dlight's GEMV, contractions,
    vector reductions, dlight's Reduction (other reductions), the elementwise fallback."""
    from tvm.s_tir import dlight

    return [dlight.cpu.GEMV(), Contraction(), VectorReduction(), dlight.cpu.Reduction(),
            Elementwise()]
