"""Built-in snapc passes. Importing this package registers them (``snapc passes`` lists them)."""

from snapc.passes.remove_blocks import RemoveBlocks, remove_blocks

__all__ = ["RemoveBlocks", "remove_blocks"]
