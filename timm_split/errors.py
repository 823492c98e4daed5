"""Errors raised by timm_split."""

__all__ = ["SplitError"]


class SplitError(RuntimeError):
    """A model could not be split.

    Raised for a graph construct the engine cannot handle. The message names the graph node
    (``node.format_node()``) and the module path, and says what to do about it.
    """
