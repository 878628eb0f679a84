"""The Python API end to end: trace a UNet, look at its blocks, remove two, emit ONNX.

Run: python examples/python_api.py out/api-onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import snapc
from snapc.artifacts import atomic_output_dir
from snapc.passes import RemoveBlocks
from snapc.targets import get_target


def main(out_dir: str) -> None:
    """Compile `tiny` without two blocks to ONNX in ``out_dir`` and print the verification."""
    loaded = snapc.load_model("tiny")
    graph = snapc.trace(loaded.module, loaded.example_inputs, loaded.info)
    for block in graph.blocks.of_kind("transformer"):
        print(f"{block.name:32s} {block.resolution} {block.macs / 1e6:7.2f} MMACs")
    result = snapc.Pipeline([RemoveBlocks(["mid_block.attentions.0", "up_blocks.0.resnets.2"])]
                            ).run(graph)
    export, options = get_target("onnx").load()
    with atomic_output_dir(Path(out_dir), force=True) as tmp:
        manifest = export(result.graph, tmp, options())
        manifest.passes = [r.to_json() for r in result.records]
        manifest.write(tmp)
    print("verified:", manifest.verification["psnr_db"], "dB PSNR vs PyTorch")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/api-onnx")
