"""Vectorizable approximations of exp, erf and the activations built on them, for CPU builds.

On x86 and Arm, LLVM lowers TIR's ``exp`` and ``erf`` to scalar libm calls (TVM passes it no
vector math library), so a kernel holding one runs an order of magnitude below the
convolutions beside it: on ``shapes`` (batch 2, 2 cores, snapc's default CPU schedules) the
attention softmax ran at 1.6 GFLOP/s, GroupNorm + SiLU at 3-6 and the GEGLU at 2, against 80-190
for the convolutions and matmuls. TVM's own ``relax.transform.FastMathTransform`` swaps softmax,
``exp``, ``erf`` and ``tanh`` for topi's polynomial approximations (``fast_softmax``,
``fast_exp``, ...), which vectorize; it does not see ``sigmoid`` or ``gelu``, which legalize to
``exp`` / ``erf`` inside their own kernels. :class:`FastActivations` rewrites those two onto
the same approximations first. float32 only (topi's fast functions are float32 ones); the
artifacts still verify against PyTorch at the usual gate.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, topi
from tvm.ir.module import IRModule
from tvm.relax import Call, Expr, PyExprMutator, expr_functor

__all__ = ["FastActivations", "fast_math_passes"]


def _is_fp32(expr: Expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and str(info.dtype) == "float32"


def _sigmoid(x: tvm.te.Tensor) -> tvm.te.Tensor:
    return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))


def _gelu(x: tvm.te.Tensor) -> tvm.te.Tensor:
    """The exact (erf) GELU, as ``relax.nn.gelu`` computes it, on topi's fast_erf."""
    half_erf = topi.multiply(topi.fast_erf(topi.multiply(x, 1.0 / math.sqrt(2.0))), 0.5)
    return topi.multiply(x, topi.add(half_erf, 0.5))


@expr_functor.mutator
class _ActivationRewriter(PyExprMutator):
    def visit_call_(self, call: Call) -> Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not call.args or not _is_fp32(call.args[0]):
            return call
        if call.op.name == "relax.sigmoid":
            return self.builder_.call_te(_sigmoid, call.args[0], primfunc_name_hint="sigmoid")
        if call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastActivations")
class FastActivations:
    """Rewrite float32 ``sigmoid`` and ``gelu`` onto topi's fast_exp / fast_erf."""

    def transform_module(self, mod: IRModule, ctx: tvm.transform.PassContext) -> IRModule:
        rewriter = _ActivationRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()


def fast_math_passes() -> list[tvm.transform.Pass]:
    """The passes, in order, that put the CPU builds' transcendental functions on fast_exp /
    fast_erf (before legalization: they match Relax operators)."""
    return [FastActivations(), relax.transform.FastMathTransform()]
