"""The packing pass: a member's aten graph -> one graph that runs all S members at once.

Every tensor of the member graph becomes a *packed value* (:class:`PV`): one tensor holding the S members'
copies, with the member dim folded into dim ``fold`` (member-major: ``[..., S*d, ...]``), or a *shared* tensor
(``fold=None``) that is the same for every member (the input when all members see one batch, index tables,
``arange``...). ``stacked`` views any packed value as ``[S, *shape]`` without copying. Each op has a rule
that emits the packed op(s) into a new graph, computing on meta tensors as it goes, so every decision is made
once from exact shapes and the result is a plain ``fx.GraphModule`` of aten calls:

* convolution: input folded into channels, weights concatenated, ``groups * S``;
* ``mm``/``addmm`` (linear layers): one ``bmm``/``baddbmm`` over the stacked members;
* ``bmm``/``baddbmm``/scaled-dot-product attention: the member dim folded into the batch dim, so the S
  members' heads run side by side in one call;
* BatchNorm/GroupNorm over ``S*C`` channels (``S*groups``), LayerNorm per member (normalise, then the
  stacked affine);
* pointwise ops on the folded tensors (broadcasting through the stacked views), views/permutes/reductions/
  ``cat``/``split``... by moving the fold, pooling/upsampling/padding with the fold in a leading dim;
* ops without a rule run once per member inside the graph (``looped``), or raise :class:`PackingError`
  naming the op and module with ``strict=True``.
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from ..trace import norm_dim

_logger = logging.getLogger(__name__)

__all__ = ["PackingError", "PV", "Packer"]

aten = torch.ops.aten


class PackingError(ValueError):
    """An op of the member graph has no packing rule (the message names the op and module)."""


class PV:
    """A packed value: ``node`` holds S member tensors of ``shape``, folded into dim ``fold`` (None: shared)."""

    __slots__ = ("node", "fold", "shape")

    def __init__(self, node: fx.Node, fold: Optional[int], shape: Sequence[int]):
        self.node, self.fold, self.shape = node, fold, tuple(shape)

    def __repr__(self) -> str:
        return f"PV({self.node.name}, fold={self.fold}, shape={self.shape})"


def _name(func: Any) -> str:
    return getattr(getattr(func, "overloadpacket", None), "__name__", getattr(func, "__name__", str(func)))


# ops that act elementwise but carry no `pointwise` tag, or that only depend on their input's shape
_ELEMENTWISE = {
    "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "mish", "softplus", "relu",
    "threshold", "native_dropout", "clone", "_to_copy", "alias", "detach", "lift_fresh_copy", "empty_like",
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "bernoulli", "fill", "zero", "copy",
    "uniform", "normal", "exponential", "_prelu_kernel", "masked_fill", "where", "clamp", "clamp_min",
    "clamp_max", "logit", "erfinv", "nan_to_num", "sign", "gelu_", "hardswish_", "hardsigmoid_", "relu_",
    "silu_", "hardtanh_", "leaky_relu_", "elu_", "mish_",
}
_DIM_ARGS = ("dim", "dims", "dim1", "dim2")
# reductions whose dim=None (or []) means every dim
_REDUCE_ALL = {"sum", "mean", "amax", "amin", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm",
               "logsumexp", "prod", "any", "all", "nansum"}
_FULL_REDUCTIONS = {"sum": aten.sum.dim_IntList, "mean": aten.mean.dim, "max": aten.amax.default,
                    "min": aten.amin.default}
# ops over [N, C, *spatial] that treat every (n, c) plane alone; value: the number of spatial dims
_PLANE = {"max_pool2d_with_indices": 2, "avg_pool2d": 2, "_adaptive_avg_pool2d": 2, "adaptive_max_pool2d": 2,
          "max_pool3d_with_indices": 3, "avg_pool3d": 3, "_adaptive_avg_pool3d": 3, "adaptive_max_pool3d": 3,
          "max_pool1d": 1, "max_pool1d_with_indices": 1, "avg_pool1d": 1, "adaptive_max_pool1d": 1,
          "upsample_nearest1d": 1, "upsample_nearest2d": 2, "upsample_nearest3d": 3, "upsample_linear1d": 1,
          "upsample_bilinear2d": 2, "upsample_bicubic2d": 2, "upsample_trilinear3d": 3,
          "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2, "_upsample_nearest_exact2d": 2,
          "reflection_pad1d": 1, "reflection_pad2d": 2, "reflection_pad3d": 3, "replication_pad1d": 1,
          "replication_pad2d": 2, "replication_pad3d": 3, "im2col": 2, "col2im": 1, "pixel_shuffle": 2,
          "pixel_unshuffle": 2}


def _op_str(func: Any) -> str:
    return str(func) if hasattr(func, "overloadpacket") else f"torch.{getattr(func, '__name__', func)}"


def _is_inplace(func: Any) -> bool:
    name = _name(func)
    return name.endswith("_") and not name.endswith("__")


def _is_elementwise(func: Any) -> bool:
    name = _name(func)
    return torch.Tag.pointwise in getattr(func, "tags", ()) or name in _ELEMENTWISE or \
        (name.endswith("_") and name[:-1] in _ELEMENTWISE)


class Packer:
    """Builds the packed graph from a member graph (see the module docstring).

    Args:
        S: the number of members.
        channels_last: run 4-d convolution inputs and weights channels-last.
        device: the members' device (what a ``.to(x.device)`` recorded on meta becomes).
        strict: raise :class:`PackingError` for an op without a rule instead of running it per member.
    """

    def __init__(self, S: int, channels_last: bool = False, strict: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.S, self.channels_last, self.strict, self.device = S, channels_last, strict, device
        self.graph = fx.Graph()
        self.looped: List[str] = []
        self._where = ""

    # ------------------------------------------------------------------ emitting
    def emit(self, func: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Add ``func(*args, **kwargs)`` to the graph; its meta value is computed now."""
        val = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
        out = func(*tree_map(val, args), **tree_map(val, kwargs))
        if isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "meta":
            kwargs = dict(kwargs, device=self.device)  # `.to(x.device)` was recorded on meta
        node = self.graph.call_function(func, args, kwargs)
        node.meta["val"] = out
        return node

    def item(self, node: fx.Node, i: int) -> fx.Node:
        out = self.graph.call_function(operator.getitem, (node, i))
        out.meta["val"] = node.meta["val"][i]
        return out

    def stacked(self, pv: PV) -> fx.Node:
        """``[S, *shape]``: a view for packed values, an expanded view for shared ones."""
        if pv.fold is None:
            return self.emit(aten.expand.default, self.emit(aten.unsqueeze.default, pv.node, 0),
                             [self.S, *pv.shape])
        if not pv.shape:
            return pv.node
        n = self.emit(aten.unflatten.int, pv.node, pv.fold, [self.S, pv.shape[pv.fold]])
        return n if pv.fold == 0 else self.emit(aten.movedim.int, n, pv.fold, 0)

    def from_stacked(self, node: fx.Node, fold: int = 0) -> PV:
        """The packed value of a ``[S, *shape]`` node, folded into dim ``fold``."""
        shape = tuple(node.meta["val"].shape[1:])
        if not shape:
            return PV(node, 0, ())
        if fold:
            node = self.emit(aten.movedim.int, node, 0, fold)
        return PV(self.emit(aten.flatten.using_ints, node, fold, fold + 1), fold, shape)

    def to_fold(self, pv: Optional[PV], fold: int) -> Optional[fx.Node]:
        """The node of ``pv`` folded into dim ``fold`` (a shared value is repeated S times)."""
        if pv is None or pv.fold == fold:
            return None if pv is None else pv.node
        if pv.fold is None:
            reps = [1] * len(pv.shape)
            reps[fold] = self.S
            return self.emit(aten.repeat.default, pv.node, reps)
        return self.from_stacked(self.stacked(pv), fold).node

    def wrap(self, node: fx.Node, fold: Optional[int], member_out: Any, stacked: bool = False) -> Any:
        """Packed values for ``node``'s outputs, given the member's outputs (a tensor or a tuple/list)."""
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            if stacked:
                return self.from_stacked(node, fold or 0)
            return PV(node, fold, member_out.shape)
        if isinstance(val, (tuple, list)):
            return [None if not isinstance(v, torch.Tensor) else
                    self.wrap(self.item(node, i), fold, member_out[i], stacked) for i, v in enumerate(val)]
        return val

    # ------------------------------------------------------------------ dispatch
    def op(self, func: Any, args: tuple, kwargs: dict, member_out: Any, where: str) -> Any:
        """Pack one op: ``args``/``kwargs`` hold packed values for tensors; returns the packed output(s)."""
        self._where = where
        flat, _ = tree_flatten((args, kwargs))
        if not any(isinstance(a, PV) and a.fold is not None for a in flat):
            node = self.emit(func, *self.nodes(args), **self.nodes(kwargs))
            return self.wrap(node, None, member_out)
        try:
            return self._dispatch(func, args, kwargs, member_out)
        except PackingError:
            raise
        except Exception as e:  # noqa: BLE001 - a rule that does not fit this op's arguments: run it per member
            if self.strict:
                raise PackingError(f"packing: op {func} in module '{where or '<root>'}' could not be packed "
                                   f"({type(e).__name__}: {e}); use the 'loop' execution") from e
            _logger.debug("packing: rule for %s in '%s' failed (%s: %s); running it per member", func, where,
                          type(e).__name__, e)
            return self.loop(func, args, kwargs, member_out)

    def _dispatch(self, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
        name = _name(func)
        if name in _FULL_REDUCTIONS and func.__name__.endswith("default") and len(args) == 1:
            dims = list(range(len(args[0].shape)))
            return _dim_op(self, _FULL_REDUCTIONS[name], (args[0], dims), kwargs, member_out)
        if name in RULES:
            return RULES[name](self, func, args, kwargs, member_out)
        if _is_elementwise(func):
            return _elementwise(self, func, args, kwargs, member_out)
        if name in _PLANE:
            return _plane(self, func, args, kwargs, member_out, _PLANE[name])
        if any(a.name in _DIM_ARGS for a in func._schema.arguments):
            return _dim_op(self, func, args, kwargs, member_out)
        return self.loop(func, args, kwargs, member_out)

    def nodes(self, tree: Any) -> Any:
        """``tree`` with every packed value replaced by its graph node."""
        return tree_map(lambda a: a.node if isinstance(a, PV) else a, tree)

    def loop(self, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
        """Run ``func`` once per member on the stacked views' slices and stack the results."""
        if self.strict:
            raise PackingError(f"packing: no rule for op {_op_str(func)} in module '{self._where or '<root>'}'; use "
                               "the 'loop' execution, or strict=False to run this op once per member")
        self.looped.append(f"{_op_str(func)} ({self._where or '<root>'})")
        cache: Dict[int, fx.Node] = {}

        def member(a: Any, i: int) -> Any:
            if not isinstance(a, PV):
                return a
            if a.fold is None:
                return a.node
            if id(a) not in cache:
                cache[id(a)] = self.stacked(a)
            return self.emit(aten.select.int, cache[id(a)], 0, i)

        outs = [self.emit(func, *tree_map(lambda a: member(a, i), args), **tree_map(lambda a: member(a, i), kwargs))
                for i in range(self.S)]
        val = outs[0].meta["val"]
        if isinstance(val, torch.Tensor):
            return self.from_stacked(self.emit(aten.stack.default, outs))
        if isinstance(val, (tuple, list)):
            return [self.from_stacked(self.emit(aten.stack.default, [self.item(o, j) for o in outs]))
                    if isinstance(v, torch.Tensor) else v for j, v in enumerate(val)]
        raise PackingError(f"packing: op {func} in module '{self._where}' returns {type(val).__name__}, which "
                           "differs per member; use the 'loop' execution")


# The packing rules: one function per kind of op, each ``rule(packer, func, args, kwargs, member_out)``.


# ------------------------------------------------------------------ elementwise
def _elementwise(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, PV)]
    packed = [a for a in flat if a.fold is not None]
    rank = max(len(a.shape) for a in flat)
    out_shape = tuple(torch.broadcast_shapes(*[a.shape for a in flat]))
    inplace = _is_inplace(func)
    main = args[0] if inplace and isinstance(args[0], PV) else max(packed, key=lambda a: math.prod(a.shape))
    if inplace and main.fold is None:  # a shared tensor updated from packed ones becomes packed
        main = PV(pk.to_fold(main, rank - len(main.shape)), rank - len(main.shape), main.shape)
        args = (main,) + tuple(args[1:])
    fold = main.fold + rank - len(main.shape)
    direct = all(a.fold is None or (a.shape == out_shape and a.fold == fold) for a in flat) and all(
        a.fold is not None or fold < rank - len(a.shape) or a.shape[fold - rank + len(a.shape)] == 1
        for a in flat)
    if direct:
        node = pk.emit(func, *pk.nodes(args), **pk.nodes(kwargs))
        return main if inplace else pk.wrap(node, fold, member_out)

    def view(a: Any) -> Any:
        if not isinstance(a, PV):
            return a
        if a.fold is None:
            return a.node
        s = pk.stacked(a)
        pad = rank - len(a.shape)
        return pk.emit(aten.view.default, s, [pk.S] + [1] * pad + list(a.shape)) if pad else s

    node = pk.emit(func, *tree_map(view, args), **tree_map(view, kwargs))
    return main if inplace else pk.wrap(node, fold, member_out, stacked=True)


# ------------------------------------------------------------------ layers
def _conv(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, w, b, *rest = args
    groups = rest[-1] * pk.S
    xs, ws = pk.to_fold(x, 1), pk.to_fold(w, 0)
    if pk.channels_last and len(x.shape) == 4:
        xs, ws = _channels_last(pk, xs), _channels_last(pk, ws)
    node = pk.emit(func, xs, ws, pk.to_fold(b, 0), *rest[:-1], groups)
    return PV(node, 1, member_out.shape)


def _channels_last(pk: Packer, node: fx.Node) -> fx.Node:
    if node.meta["val"].is_contiguous(memory_format=torch.channels_last):
        return node
    return pk.emit(aten.clone.default, node, memory_format=torch.channels_last)


def _batch_norm(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    n = next((i for i, a in enumerate(args) if not (a is None or isinstance(a, PV))), len(args))
    x, params = args[0], args[1:n]
    node = pk.emit(func, pk.to_fold(x, 1), *[pk.to_fold(p, 0) for p in params], *args[n:])
    outs = [pk.item(node, i) for i in range(len(node.meta["val"]))]
    return [PV(outs[0], 1, member_out[0].shape)] + [PV(o, 0, m.shape) for o, m in zip(outs[1:], member_out[1:])]


def _group_norm(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    x, w, b, n, c, hw, groups, eps = args
    node = pk.emit(func, pk.to_fold(x, 1), pk.to_fold(w, 0), pk.to_fold(b, 0), n, c * pk.S, hw,
                   groups * pk.S, eps)
    return pk.wrap(node, 1, member_out)


def _layer_norm(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    x, normalized, w, b, eps = args
    rank, first = len(x.shape), len(x.shape) - len(normalized)
    fold = x.fold if x.fold is not None and x.fold <= first else (0 if first > 0 else first)
    u = pk.emit(aten.unflatten.int, pk.to_fold(x, fold), fold, [pk.S, x.shape[fold]])
    node = pk.emit(func, u, normalized, None, None, eps)
    y, mean, rstd = (pk.item(node, i) for i in range(3))
    affine = [pk.S] + [1] * (rank - fold - len(normalized)) + list(normalized)
    for p, op in ((w, aten.mul.Tensor), (b, aten.add.Tensor)):
        if p is not None:
            y = pk.emit(op, y, pk.emit(aten.view.default, pk.stacked(p), affine))
    flat = lambda n: pk.emit(aten.flatten.using_ints, n, fold, fold + 1)  # noqa: E731
    return [PV(flat(n), fold, m.shape) for n, m in zip((y, mean, rstd), member_out)]


def _mm(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    if _name(func) == "mm":
        node = pk.emit(aten.bmm.default, pk.stacked(args[0]), pk.stacked(args[1]))
        return pk.from_stacked(node)
    bias, a, b = args[:3]
    bias_node = bias.node if bias.fold is None else pk.stacked(bias)
    if bias.fold is not None and len(bias.shape) == 1:
        bias_node = pk.emit(aten.unsqueeze.default, bias_node, 1)
    node = pk.emit(aten.baddbmm.default, bias_node, pk.stacked(a), pk.stacked(b), **kwargs)
    return pk.from_stacked(node)


def _batched(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    """Ops that treat dim 0 as independent samples (bmm, baddbmm, grid_sample): fold the members there."""
    def batch(a: Any) -> Any:
        if not isinstance(a, PV):
            return a
        if a.fold is None and (len(a.shape) < len(member_out.shape) or a.shape[0] == 1):
            return a.node  # broadcasts (baddbmm's bias)
        return pk.to_fold(a, 0)

    node = pk.emit(func, *tree_map(batch, args), **tree_map(batch, kwargs))
    return pk.wrap(node, 0, member_out)


def _sdpa(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    """Attention with the members side by side in a batch dim of q/k/v: the batch, or the heads when a
    per-member mask (a relative position bias ``[heads, N, N]``) is folded there."""
    q, rank = args[0], len(args[0].shape)
    fold = q.fold if q.fold is not None and q.fold < rank - 2 else 0
    args, kwargs = list(args), dict(kwargs)
    where = (args, 3) if len(args) > 3 else (kwargs, "attn_mask")
    mask = where[0][where[1]] if len(args) > 3 or "attn_mask" in kwargs else None
    if isinstance(mask, PV):
        lead = rank - len(mask.shape)
        if mask.fold is not None:  # fold where the mask has q's size: its heads or batch dim
            dims = [f for f in range(lead, rank - 2) if mask.shape[f - lead] == q.shape[f]]
            if not dims:
                return pk.loop(func, tuple(args), kwargs, member_out)
            fold = mask.fold + lead if mask.fold + lead in dims else dims[-1]
            where[0][where[1]] = PV(pk.to_fold(mask, fold - lead), fold - lead, mask.shape)
        elif fold >= lead and mask.shape[fold - lead] != 1:  # a shared mask that does not broadcast
            if lead:
                return pk.loop(func, tuple(args), kwargs, member_out)
            where[0][where[1]] = PV(pk.to_fold(mask, fold), fold, mask.shape)
    qkv = [pk.to_fold(a, fold) for a in args[:3]]
    node = pk.emit(func, *qkv, *pk.nodes(args[3:]), **pk.nodes(kwargs))
    return PV(node, fold, member_out.shape)


def _plane(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any, spatial: int) -> Any:
    x = args[0]
    lead = len(x.shape) - spatial
    if lead <= 0 or any(isinstance(a, PV) for a in tree_flatten((args[1:], kwargs))[0]):
        return pk.loop(func, args, kwargs, member_out)
    fold = x.fold if x.fold < lead else 0
    node = pk.emit(func, pk.to_fold(x, fold), *args[1:], **kwargs)
    return pk.wrap(node, fold, member_out)


def _pad(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, pad = args[0], args[1]
    if x.fold < len(x.shape) - len(pad) // 2:
        return PV(pk.emit(func, x.node, *args[1:], **kwargs), x.fold, member_out.shape)
    return pk.from_stacked(pk.emit(func, pk.stacked(x), *args[1:], **kwargs))


# ------------------------------------------------------------------ layout
def _view(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, new = args[0], tuple(member_out.shape)
    for old_dims, new_dims in _groups(x.shape, new):
        if x.fold in old_dims:
            if old_dims[0] == x.fold and new_dims:
                size = list(new)
                size[new_dims[0]] *= pk.S
                # the packed layout may not be viewable where the member's was: reshape copies then
                return PV(pk.emit(aten.reshape.default, x.node, size), new_dims[0], new)
            break
    return pk.from_stacked(pk.emit(aten.reshape.default, pk.stacked(x), [pk.S, *new]))


def _expand(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, new = args[0], tuple(member_out.shape)
    fold = x.fold + len(new) - len(x.shape)
    if x.shape and x.shape[x.fold] == new[fold]:
        size = list(new)
        size[fold] *= pk.S
        return PV(pk.emit(func, x.node, size), fold, new)
    s = pk.emit(aten.view.default, pk.stacked(x), [pk.S] + [1] * (len(new) - len(x.shape)) + list(x.shape))
    return pk.from_stacked(pk.emit(func, s, [pk.S, *new]))


def _permute(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, rank = args[0], len(args[0].shape)
    if _name(func) == "permute":
        perm = [norm_dim(d, rank) for d in args[1]]
    else:
        perm = list(range(rank))
        if _name(func) == "transpose":
            d0, d1 = norm_dim(args[1], rank), norm_dim(args[2], rank)
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif rank == 2:
            perm = [1, 0]
    return PV(pk.emit(func, x.node, *args[1:]), perm.index(x.fold) if rank else 0, member_out.shape)


def _repeat(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x, reps = args[0], list(args[1])
    pad = len(reps) - len(x.shape)
    if x.shape and reps[x.fold + pad] == 1:
        return PV(pk.emit(func, x.node, reps), x.fold + pad, member_out.shape)
    s = pk.emit(aten.view.default, pk.stacked(x), [pk.S] + [1] * pad + list(x.shape))
    return pk.from_stacked(pk.emit(func, s, [1] + reps))


def _new(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    """``x.new_empty(size)`` and friends of a packed ``x``: one fresh tensor per member (independent draws
    when filled randomly, as DropPath does)."""
    size = list(member_out.shape)
    packed = [size[0] * pk.S] + size[1:] if size else [pk.S]
    rest = list(args[2:])
    if _name(func) == "new_empty_strided":
        return pk.loop(func, args, kwargs, member_out)
    return PV(pk.emit(func, args[0].node, packed, *pk.nodes(rest), **kwargs), 0, size)


def _restride(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    """``as_strided`` that only restrides size-1 dims of a row-major tensor (what ``mean`` over a permuted
    input records): the same values, so the packed value passes through. Any other use reads the storage
    layout, which packing changes: not packable."""
    x, size, stride = args[0], list(args[1]), list(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset")
    row_major = [math.prod(size[i + 1:]) for i in range(len(size))]
    if size == list(x.shape) and not offset and all(a == b for a, b, n in zip(stride, row_major, size) if n > 1):
        return x
    raise PackingError(f"packing: {func} in module '{pk._where}' reads the storage layout, which packing "
                       "changes; use the 'loop' execution")


def _unfold(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    """``x.unfold(dim, size, step)``: windows along ``dim`` in a new last dim."""
    x, dim, size, step = args
    dim = norm_dim(dim, len(x.shape))
    if x.fold != dim:
        return PV(pk.emit(func, x.node, dim, size, step), x.fold, member_out.shape)
    return pk.from_stacked(pk.emit(func, pk.stacked(x), dim + 1, size, step))


def _squeeze(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> PV:
    x = args[0]
    dims = args[1] if len(args) > 1 else [i for i, d in enumerate(x.shape) if d == 1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    return _dim_op(pk, aten.squeeze.dims, (x, dims), {}, member_out)


def _index(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    x, indices = args
    used = [i for i, t in enumerate(indices) if t is not None]
    if x.fold is None or any(indices[i].fold is not None for i in used) or \
            used != list(range(used[0], used[-1] + 1)):
        return pk.loop(func, args, kwargs, member_out)
    idx = [None] + [None if t is None else t.node for t in indices]
    return pk.from_stacked(pk.emit(func, pk.stacked(x), idx))


# ------------------------------------------------------------------ ops along dims
def _dim_op(pk: Packer, func: Any, args: tuple, kwargs: dict, member_out: Any) -> Any:
    """Ops with ``dim`` arguments: keep the fold where it is if the op does not touch it, else run the op
    on the stacked members with every dim shifted by one."""
    schema = [a.name for a in func._schema.arguments]
    bound = {a.name: a.default_value for a in func._schema.arguments
             if a.name in _DIM_ARGS and a.has_default_value()}
    bound.update(zip(schema, args))
    bound.update(kwargs)
    main = next(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, PV) and a.fold is not None)
    rank = len(main.shape)
    outs = [t for t in tree_flatten(member_out)[0] if isinstance(t, torch.Tensor)]
    grow = bool(outs) and len(outs[0].shape) == rank + 1
    dims = _dims(bound, rank + grow, _name(func))
    if dims is None:
        return pk.loop(func, args, kwargs, member_out)
    k = main.fold
    if k not in dims and not (grow and len(dims) != 1):
        out_rank = len(outs[0].shape) if outs else rank
        new_k = k + (dims[0] <= k) if grow else (k if out_rank == rank else k - sum(d < k for d in dims))
        if all(len(t.shape) == len(outs[0].shape) for t in outs):
            same_rank = lambda a: a.node if a.fold is None and len(a.shape) != rank else pk.to_fold(a, k)  # noqa
            new_args = tree_map(lambda a: same_rank(a) if isinstance(a, PV) else a, (args, kwargs))
            node = pk.emit(func, *new_args[0], **new_args[1])
            return pk.wrap(node, new_k, member_out)
    shifted = {n: _shift(bound[n], dims) for n in _DIM_ARGS if n in bound}
    stack = lambda a: a.node if a.fold is None and len(a.shape) != rank else pk.stacked(a)  # noqa: E731
    new = tree_map(lambda a: stack(a) if isinstance(a, PV) else a, bound)
    new.update(shifted)
    pos = [new[n] for n in schema[:len(args)]]
    kw = {n: new[n] for n in new if n not in schema[:len(args)]}
    node = pk.emit(func, *pos, **kw)
    return pk.wrap(node, 0, member_out, stacked=True)


def _dims(bound: Dict[str, Any], rank: int, name: str) -> Optional[List[int]]:
    dims: List[int] = []
    for n in _DIM_ARGS:
        if n not in bound:
            continue
        d = bound[n]
        if d is None or (isinstance(d, (list, tuple)) and not d):
            if name not in _REDUCE_ALL:
                return None
            d = list(range(rank))
            bound[n] = d
        dims += [norm_dim(int(i), rank) for i in (d if isinstance(d, (list, tuple)) else [d])]
    return dims


def _shift(d: Any, dims: List[int]) -> Any:
    if isinstance(d, (list, tuple)):
        return [int(i) + 1 if i >= 0 else int(i) for i in d]
    return d + 1 if d >= 0 else d


# op name -> rule (ops not named here: elementwise ops, pooling planes, ops with dim arguments, else the loop)
RULES: Dict[str, Callable[..., Any]] = {
        "convolution": _conv, "native_batch_norm": _batch_norm,
        "_native_batch_norm_legit": _batch_norm, "_native_batch_norm_legit_no_training": _batch_norm,
        "native_group_norm": _group_norm, "native_layer_norm": _layer_norm,
        "mm": _mm, "addmm": _mm, "bmm": _batched, "baddbmm": _batched,
        "scaled_dot_product_attention": _sdpa, "grid_sampler_2d": _batched,
        "view": _view, "_unsafe_view": _view, "reshape": _view, "expand": _expand,
        "permute": _permute, "transpose": _permute, "t": _permute, "repeat": _repeat,
        "new_empty": _new, "new_zeros": _new, "new_ones": _new, "new_full": _new,
        "new_empty_strided": _new, "index": _index, "_unsafe_index": _index,
        "squeeze": _squeeze, "constant_pad_nd": _pad, "as_strided": _restride,
        "as_strided_": _restride, "unfold": _unfold,
}


def _groups(old: Sequence[int], new: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Match the dims of a reshape: groups of old dims and new dims with equal products (row-major)."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        o, n = ([i], old[i]) if i < len(old) else ([], 1)
        m, p = ([j], new[j]) if j < len(new) else ([], 1)
        i, j = i + bool(o), j + bool(m)
        while n != p:
            if n < p and i < len(old):
                o.append(i)
                n *= old[i]
                i += 1
            elif j < len(new):
                m.append(j)
                p *= new[j]
                j += 1
            else:
                return []
        groups.append((o, m))
    return groups
