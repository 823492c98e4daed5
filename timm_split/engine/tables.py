"""Computed tables: the layer -> layout table for buffers a layer computes from its own config at init.

Some layers cache a table they compute in ``__init__`` (timm's ``RotaryEmbeddingCat`` keeps ``pos_embed``, the
sines and cosines of its position grid, built from its ``bands`` buffer). The forward only reads the table, so
the trace sees a leaf tensor: cut to a new width, ``[sin | cos]`` would become ``[sin | sin, cos]`` and the
member would rotate by garbage, silently. A layer listed here says how the table's width is made from its other
buffers (:func:`table_layout`): the analysis ties those atoms (the widths stay consistent), and the rebuild asks
the layer to recompute its tables at the new widths with its own code, timm's ``init_non_persistent_buffers``
(:func:`recompute_tables`).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from torch import nn

from ..errors import SplitError

_logger = logging.getLogger(__name__)

__all__ = ["TABLES", "Layout", "table_layout", "source_dim", "recompute_tables"]


class Layout(NamedTuple):
    """How a layer's tables are made. A factor is a fixed size (int) or ``'buffer:dim'``, that dim of another
    buffer of the same layer.

    Attributes:
        ties: ``(buffer, dim, factors)``: the buffer's dim is the product of the factors, row-major.
        attributes: ``(attribute, factor, multiple)``: the attribute is ``multiple`` times the factor's width.
    """

    ties: Tuple[Tuple[str, int, Tuple[Union[int, str], ...]], ...]
    attributes: Tuple[Tuple[str, str, int], ...] = ()


def _rope_cat(mod: nn.Module) -> Optional[Layout]:
    """``pos_embed [N, 2 * dim]``: sin then cos, each ``ndim`` axes x ``bands``, interleaved (``x 2``) or, with
    ``rotate_half``, repeated (``2 x``) (timm's ``build_rotary_pos_embed``); ``dim = 4 * bands``, which the
    layer reads only to compute them."""
    if getattr(mod, "pos_embed", None) is None or getattr(mod, "bands", None) is None or not mod.feat_shape:
        return None
    ndim = len(mod.feat_shape)
    half = (2, ndim, "bands:0") if mod.rotate_half else (ndim, "bands:0", 2)
    if mod.pos_embed.shape[-1] != 4 * ndim * mod.bands.shape[0]:
        return None
    return Layout(ties=(("pos_embed", -1, (2, *half)),), attributes=(("dim", "bands:0", 4),))


def _rope_classes() -> Dict[type, Callable[[nn.Module], Optional[Layout]]]:
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
    return {RotaryEmbeddingCat: _rope_cat}


TABLES = _rope_classes()  # layer class -> its layout rule


def table_layout(mod: nn.Module) -> Optional[Layout]:
    """The layout of ``mod``'s computed tables, or None for a layer not in :data:`TABLES` (or not caching one)."""
    rule = next((TABLES[c] for c in type(mod).__mro__ if c in TABLES), None)
    return rule(mod) if rule is not None else None


def source_dim(path: str, factor: str, param_dims: Dict[str, list]) -> Optional[tuple]:
    """The dim a ``'buffer:dim'`` factor of the layer at ``path`` names, from the analysis' ``param_dims``; None
    where the trace did not record that buffer."""
    src, _, j = factor.partition(":")
    dims = param_dims.get(f"{path}.{src}" if path else src)
    return None if dims is None else dims[int(j)]


def recompute_tables(member: nn.Module) -> List[str]:
    """Recompute, in place, the tables of every listed layer of a rebuilt member with the layer's own
    ``init_non_persistent_buffers``, at its new widths.

    Args:
        member: a member on a real device, its attributes set by the plan.

    Returns:
        The paths of the layers recomputed.

    Raises:
        SplitError: where a layer's own computation does not give the planned shapes (a plan that broke the
            table's layout).
    """
    done = []
    for path, mod in member.named_modules():
        if table_layout(mod) is None:
            continue
        shapes = {n: tuple(b.shape) for n, b in mod.named_buffers(recurse=False)}
        try:
            mod.init_non_persistent_buffers()
        except RuntimeError as e:
            raise SplitError(f"{path or 'model'} ({type(mod).__name__}) cannot recompute its tables at the "
                             f"planned widths {shapes}: {e}") from e
        got = {n: tuple(b.shape) for n, b in mod.named_buffers(recurse=False)}
        assert got == shapes, f"{path}: {got} != {shapes}"
        done.append(path)
    if done:
        _logger.debug("recomputed the tables of %s", done)
    return done
