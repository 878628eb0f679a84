"""Built-in snapc passes. Importing this package registers them (``snapc passes`` lists them)."""

from snapc.passes.remove_blocks import RemoveBlocks, remove_blocks
from snapc.passes.search import SearchBlocks, search_blocks

__all__ = ["RemoveBlocks", "remove_blocks", "SearchBlocks", "search_blocks"]
