"""Built-in snapc passes. Importing this package registers them (``snapc passes`` lists them)."""

from snapc.passes.ane_layout import AneAttentionLayout
from snapc.passes.fuse import FUSIONS, DecomposeFusedOps, fusion_passes, lowering_passes
from snapc.passes.quantize import Quantize
from snapc.passes.remove_blocks import RemoveBlocks, remove_blocks
from snapc.passes.search import SearchBlocks, search_blocks

__all__ = ["RemoveBlocks", "remove_blocks", "SearchBlocks", "search_blocks",
           "AneAttentionLayout", "FUSIONS", "DecomposeFusedOps", "fusion_passes",
           "lowering_passes", "Quantize"]
