"""Store the weights that a model only ever transposes already transposed.

PyTorch's ``Linear`` keeps its weight as (out, in) and the exported program computes
``x @ permute(W, [1, 0])``; imported into Relax as it is, every call of the built model
transposes every Linear weight again (129 transpose kernels per call of `shapes` at batch 2,
about 3 ms of its kernel time on x86). Relax's ``LiftTransformParams`` would move them into a
separate ``transform_params`` function that every runtime (here, on the phone, in
``run_on_device.py``) would have to call; instead, a weight whose only use is one 2-D
transpose becomes a parameter of the transposed shape under the same name, the transpose
binding becomes that parameter, and the stored array is transposed once here. The manifest
lists those names (``extra.tvm.param_transposed``) for anyone rebuilding the weights from a
state dict.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapc.targets.tvm_build import Imported

__all__ = ["pretranspose_weights"]


def _is_2d_transpose(value: object) -> bool:
    import tvm
    from tvm import relax

    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
            and value.op.name == "relax.permute_dims"):
        return False
    axes = value.attrs.axes
    return len(value.args[0].ty.shape) == 2 and (
        axes is not None and [int(a) for a in axes] == [1, 0])


def pretranspose_weights(imported: Imported) -> Imported:
    """Return ``imported`` with every weight used only by one 2-D transpose stored
    transposed (a new module and arrays; ``imported`` is not changed) and those weights'
    names in ``transposed``."""
    import tvm
    from tvm import relax

    main = imported.module["main"]
    n_inputs = len(imported.input_names)
    weights = list(main.params[n_inputs:])
    bindings = [b for block in main.body.blocks for b in block.bindings]
    uses = Counter(v for b in bindings for v in relax.analysis.free_vars(b.value))
    uses.update(relax.analysis.free_vars(main.body.body))
    weight_set = set(weights)
    chosen = {b.value.args[0]: b for b in bindings
              if isinstance(b, relax.VarBinding) and _is_2d_transpose(b.value)
              and b.value.args[0] in weight_set and uses[b.value.args[0]] == 1}
    if not chosen:
        return replace(imported, transposed=[])
    new_vars = {w: relax.Var(w.name, binding.var.ty) for w, binding in chosen.items()}
    replaced = {binding.var: new_vars[w] for w, binding in chosen.items()}
    blocks = []
    for block in main.body.blocks:
        kept = [relax.VarBinding(b.var, replaced[b.var]) if b.var in replaced else b
                for b in block.bindings]
        blocks.append(relax.DataflowBlock(kept) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(kept))
    params = [*main.params[:n_inputs], *(new_vars.get(w, w) for w in weights)]
    func = relax.Function(params, relax.SeqExpr(blocks, main.body.body), main.ret_ty,
                          main.is_pure, main.attrs, main.span)
    module = tvm.IRModule(dict(imported.module.functions_items()))
    module[module.get_global_var("main")] = func
    module = relax.transform.CanonicalizeBindings()(module)
    arrays = [a.T.copy() if w in chosen else a
              for w, a in zip(weights, imported.params, strict=True)]
    return replace(imported, module=module, params=arrays,
                   transposed=[w.name for w in weights if w in chosen])
