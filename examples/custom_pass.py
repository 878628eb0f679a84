"""A user-written pass in ten lines, composed with snapc's built-in RemoveBlocks.

Run: python examples/custom_pass.py
"""

from __future__ import annotations

import torch

from snapc import Change, PassContext, PassResult, Pipeline, load_graph, snapc_pass, verify
from snapc.passes import RemoveBlocks


@snapc_pass(name="drop_dropout")
def drop_dropout(graph, ctx: PassContext) -> PassResult:
    """Replace every dropout node (an identity at inference) by its input."""
    gm = graph.edited()
    dropped = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    for node in dropped:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    changes = tuple(Change("drop_dropout", "dropout_to_input", n.name, removed=1) for n in dropped)
    return PassResult(graph.reexport(gm) if dropped else graph, changes)


def main() -> None:
    """Compose the user pass with RemoveBlocks on the tiny UNet and print what changed."""
    graph = load_graph("tiny")
    pipeline = Pipeline([drop_dropout, RemoveBlocks(["mid_block.attentions.0"])])
    result = pipeline.run(graph, PassContext(verify=True))
    for record in result.records:
        print(f"{record.name}: {len(record.changes)} change(s), "
              f"PSNR vs input {record.numerics.psnr_db:.1f} dB")
    reference = RemoveBlocks(["mid_block.attentions.0"]).run(graph, PassContext()).graph
    print("user pass is exact:", verify(reference, result.graph, graph.example_inputs))


if __name__ == "__main__":
    main()
