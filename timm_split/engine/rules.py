"""The op -> rule table of the channel analysis: one rule per aten op (or op family).

A rule reads the dims of a node's inputs and outputs (``node.meta['split_dims']``, filled in by the
interpreter in :mod:`timm_split.engine.analyse`) and unifies, refines or fixes their atoms. Rules get the
interpreter as ``an`` and use only its public surface: ``an.A`` (the :class:`~timm_split.engine.atoms.Atoms`),
``an.dims(node)``, ``an.same``, ``an.reshape``, ``an.couple_to_module_inputs`` and the cost lists ``an.mac_terms``,
``an.heads`` and ``an.groups_atoms``. Every rule that is unsure fixes: fixing a dim is always safe.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx

from ..count import FVCORE_PER_INPUT, FVCORE_PER_OUTPUT, fvcore_norm_macs
from ..trace import norm_dim

aten = torch.ops.aten

__all__ = ["RULES", "EQUAL_SPLITS", "rule_for", "module_of", "shape_of", "norm_dim"]


def shape_of(v) -> Tuple[int, ...]:
    """The shape of a tensor value, ``()`` for anything else."""
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def module_of(node: fx.Node) -> str:
    """The path of the innermost module that ran ``node`` ('' for the model itself)."""
    st = node.meta.get("nn_module_stack") or []
    return st[-1] if st else ""


RULES: Dict[object, Callable[[object, fx.Node], Optional[bool]]] = {}


def rule_for(node: fx.Node) -> Optional[Callable[[object, fx.Node], Optional[bool]]]:
    """The rule for ``node``'s op (by overload, else by overload packet), or None. A rule returns False where it
    does not apply (the interpreter then tries broadcasting, and fixes everything as its last resort)."""
    return RULES.get(node.target) or RULES.get(getattr(node.target, "overloadpacket", None))


def _rule(*targets):
    def deco(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_as.default,
       aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.alias.default,
       aten.flatten.using_ints, aten.clone.default, aten.contiguous.default, aten.detach.default,
       aten._to_copy.default, aten.lift_fresh.default)
def _r_reshape(an, node: fx.Node):
    if not isinstance(node.meta["val"], torch.Tensor):
        return False
    an.reshape(node)


@_rule(aten.permute.default)
def _r_permute(an, node):
    src, perm = node.args[0], node.args[1]
    sd, od = an.dims(src), node.meta["split_dims"]
    for i, p in enumerate(perm):
        an.A.unify(sd[norm_dim(p, len(sd))], od[i])


@_rule(aten.transpose.int)
def _r_transpose(an, node):
    src, a, b = node.args[:3]
    sd = list(an.dims(src))
    a, b = norm_dim(a, len(sd)), norm_dim(b, len(sd))
    sd[a], sd[b] = sd[b], sd[a]
    for x, y in zip(sd, node.meta["split_dims"]):
        an.A.unify(x, y)


@_rule(aten.t.default)
def _r_t(an, node):
    sd = list(an.dims(node.args[0]))[::-1]
    for x, y in zip(sd, node.meta["split_dims"]):
        an.A.unify(x, y)


@_rule(aten.expand.default)
def _r_expand(an, node):
    src = node.args[0]
    sh, od = shape_of(src.meta["val"]), node.meta["split_dims"]
    out_shape = shape_of(node.meta["val"])
    off = len(out_shape) - len(sh)
    for k in range(off):
        an.A.fix_dims([od[k]], "expand")
    for k, s in enumerate(sh):
        n = out_shape[off + k]
        back = None if s == n else _reduced_from(src, k)
        if s == n:
            an.A.unify(an.dims(src)[k], od[off + k])
        elif back is not None and shape_of(back.meta["val"])[k] == n:
            an.A.unify(an.dims(back)[k], od[off + k])  # a statistic broadcast back over what it reduced
        else:
            an.A.fix_dims([od[off + k]], "expand")
    an.couple_to_module_inputs(node)


# reductions over a ``dim`` argument: op -> position of ``dim`` (``keepdim`` follows it)
_REDUCTIONS = {**dict.fromkeys([
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.std.correction, aten.var_mean.correction, aten.logsumexp.default, aten.max.dim, aten.min.dim,
    aten.argmax.default, aten.argmin.default, aten.prod.dim_int, aten.any.dim, aten.all.dim], 1),
    aten.linalg_vector_norm.default: 2}


def _reduced_from(node: fx.Node, k: int) -> Optional[fx.Node]:
    """The tensor whose dim ``k`` a keepdim reduction took to size 1, looking back through ops of one tensor input
    and unchanged shape (``x.var(dim=(2, 3, 4), keepdim=True).add(eps).sqrt()``: EvoNorm's group std, which is
    then expanded to ``x.shape``), or None."""
    shape = shape_of(node.meta.get("val"))
    while node.op == "call_function":
        ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if node.target in _REDUCTIONS:
            src = node.args[0]
            dims = _arg(node, _REDUCTIONS[node.target], "dim")
            dims = [dims] if isinstance(dims, int) else list(dims or ())
            nd = len(shape_of(src.meta["val"]))
            return src if nd == len(shape) and k in [d % nd for d in dims] else None
        if len(ins) != 1 or shape_of(ins[0].meta["val"]) != shape:
            return None
        node = ins[0]
    return None


@_rule(aten.repeat.default)
def _r_repeat(an, node):
    src, reps = node.args[:2]
    sd, od = an.dims(src), node.meta["split_dims"]
    off = len(reps) - len(sd)
    for k in range(off):
        an.A.fix_dims([od[k]], "repeat")
    for k, d in enumerate(sd):
        r = reps[off + k]
        an.A.unify((an.A.new(r, True, "repeat"),) + tuple(d), od[off + k])


@_rule(aten.select.int)
def _r_select(an, node):
    src, dim = node.args[:2]
    sd = an.dims(src)
    dim = norm_dim(dim, len(sd))
    an.A.fix_dims([sd[dim]], "indexed with select")
    for x, y in zip(sd[:dim] + sd[dim + 1:], node.meta["split_dims"]):
        an.A.unify(x, y)


@_rule(aten.unbind.int)
def _r_unbind(an, node):
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    sd = an.dims(src)
    dim = norm_dim(dim, len(sd))
    an.A.fix_dims([sd[dim]], "unbind")
    for out in node.meta["split_dims"]:
        for x, y in zip(sd[:dim] + sd[dim + 1:], out):
            an.A.unify(x, y)


@_rule(aten.slice.Tensor)
def _r_slice(an, node):
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    sd, od = an.dims(src), node.meta["split_dims"]
    dim = norm_dim(dim, len(sd))
    size = shape_of(src.meta["val"])[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else min(end, size))
    start = max(0, min(start, size))
    an.same(src, od, skip=(dim,))
    if end <= start:  # an empty slice carries no channels
        an.A.fix_dims([od[dim]], "empty slice")
    elif start == 0 and end >= size and step == 1:
        an.A.unify(sd[dim], od[dim])
    elif step != 1:
        if size % step == 0 and start < step and end >= size:  # x[..., s::k] picks one of k interleaved parts
            an.A.unify(sd[dim], tuple(od[dim]) + (an.A.new(step, True, "slice stride"),), "strided slice")
        else:
            an.A.fix_dims([sd[dim], od[dim]], "strided slice")
    else:
        sizes = [s for s in (start, end - start, size - end)]
        pieces = an.A.split_sum(sd[dim], [s for s in sizes if s > 0])
        mid = pieces[1 if start > 0 else 0]
        an.A.unify(mid, od[dim], "slice")


def _split_outputs(an, node, sizes, dim):
    src = node.args[0]
    sd = an.dims(src)
    dim = norm_dim(dim, len(sd))
    pieces = an.A.split_sum(sd[dim], sizes)
    outs = node.meta["split_dims"]
    for p, out in zip(pieces, outs):
        an.A.unify(p, out[dim], "split")
        for k, (x, y) in enumerate(zip(sd, out)):
            if k != dim:
                an.A.unify(x, y)


EQUAL_SPLITS = frozenset({aten.split.Tensor, aten.unsafe_split.Tensor, aten.chunk.default})  # one size, equal pieces


@_rule(aten.split.Tensor, aten.unsafe_split.Tensor, aten.split_with_sizes.default,
       aten.unsafe_split_with_sizes.default, aten.chunk.default)
def _r_split(an, node):
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = [shape_of(v)[norm_dim(dim, len(shape_of(v)))] for v in node.meta["val"]]
    _split_outputs(an, node, sizes, dim)
    if node.target in EQUAL_SPLITS:  # one split size for all pieces: the full pieces stay equal
        outs = node.meta["split_dims"]
        d = norm_dim(dim, len(outs[0]))
        full = [o[d] for o, s in zip(outs, sizes) if s == sizes[0]]
        for o in full[1:]:
            an.A.unify(full[0], o, "equal split")
        if len(full) != len(sizes):  # a ragged last piece ties the total to the split size: keep fixed
            an.A.fix_dims([o[d] for o in outs], "ragged split")


@_rule(aten.cat.default)
def _r_cat(an, node):
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    od = node.meta["split_dims"]
    dim = norm_dim(dim, len(od))
    tensors = [t for t in tensors if len(shape_of(t.meta["val"])) == len(od)]  # legacy empty tensors
    for t in tensors:
        an.same(t, od, skip=(dim,))
    an.A.unify(an.A.make_sum([an.dims(t)[dim] for t in tensors]), od[dim], "cat")


@_rule(aten.stack.default)
def _r_stack(an, node):
    tensors = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else 0
    od = node.meta["split_dims"]
    dim = norm_dim(dim, len(od))
    an.A.fix_dims([od[dim]], "stack")
    rest = od[:dim] + od[dim + 1:]
    for t in tensors:
        for x, y in zip(an.dims(t), rest):
            an.A.unify(x, y)


def _mm(an, node, a, b, out, batch=0):
    A = an.A
    ad, bd, od = an.dims(a), an.dims(b), out
    for k in range(batch):
        A.unify(ad[k], bd[k])
        A.unify(ad[k], od[k])
    if batch:
        an.heads.append((list(ad[:batch]), [ad[batch + 1], bd[batch + 1]]))
    A.unify(ad[batch], od[batch])
    A.unify(ad[batch + 1], bd[batch])
    A.unify(bd[batch + 1], od[batch + 1])
    an.mac_terms.append((node, list(ad) + [bd[batch + 1]], 1.0))


@_rule(aten.mm.default)
def _r_mm(an, node):
    _mm(an, node, node.args[0], node.args[1], node.meta["split_dims"])


@_rule(aten.addmm.default)
def _r_addmm(an, node):
    _mm(an, node, node.args[1], node.args[2], node.meta["split_dims"])
    _bias(an, node.args[0], node.meta["split_dims"], shape_of(node.meta["val"]))


@_rule(aten.bmm.default)
def _r_bmm(an, node):
    _mm(an, node, node.args[0], node.args[1], node.meta["split_dims"], batch=1)


@_rule(aten.baddbmm.default)
def _r_baddbmm(an, node):
    _mm(an, node, node.args[1], node.args[2], node.meta["split_dims"], batch=1)
    _bias(an, node.args[0], node.meta["split_dims"], shape_of(node.meta["val"]))


def _bias(an, bias, od, out_shape):
    if not isinstance(bias, fx.Node):
        return
    sh = shape_of(bias.meta["val"])
    off = len(out_shape) - len(sh)
    for k, s in enumerate(sh):
        if s != 1:
            an.A.unify(an.dims(bias)[k], od[off + k])


@_rule(aten.convolution.default, aten._convolution.default)
def _r_conv(an, node):
    A = an.A
    x, w, b = node.args[:3]
    transposed, groups = node.args[6], node.args[8]
    xd, wd, od = an.dims(x), an.dims(w), node.meta["split_dims"]
    A.unify(xd[0], od[0])
    _spatial(an, x, node, list(xd[2:]), list(od[2:]))
    A.fix_dims(list(wd[2:]), "kernel")
    w_in, w_out = (wd[0], wd[1]) if transposed else (wd[1], wd[0])
    if groups == 1:
        A.unify(xd[1], w_in)
        A.unify(od[1], w_out)
    else:
        depthwise = (shape_of(x.meta["val"])[1] == groups)
        g = A.new(groups, fixed=not depthwise, why="group count of a grouped conv")
        if transposed:  # weight [Cin, Cout/g, k...]
            A.unify(xd[1], w_in)
            A.unify(xd[1], (g, A.new(shape_of(x.meta["val"])[1] // groups)))
            A.unify(od[1], (g,) + tuple(w_out))
        else:  # weight [Cout, Cin/g, k...]
            A.unify(xd[1], (g,) + tuple(w_in))
            out_per = A.new(shape_of(node.meta["val"])[1] // groups)
            A.unify(od[1], (g, out_per))
            A.unify(w_out, (g, out_per))
        an.groups_atoms[node.name] = g
    if isinstance(b, fx.Node):
        A.unify(an.dims(b)[0], od[1])
    if transposed:
        an.mac_terms.append((node, list(xd) + [w_out] + list(wd[2:]), 1.0))
    else:
        an.mac_terms.append((node, list(od) + [w_in] + list(wd[2:]), 1.0))


@_rule(aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default,
       aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default)
def _r_bn(an, node):
    x = node.args[0]
    xd = an.dims(x)
    outs = node.meta["split_dims"]
    an.same(x, outs[0])
    for p in node.args[1:5]:
        if isinstance(p, fx.Node) and shape_of(p.meta["val"]):
            an.A.unify(an.dims(p)[0], xd[1])
    for o, v in zip(outs[1:], node.meta["val"][1:]):
        if shape_of(v) and shape_of(v)[0] == shape_of(x.meta["val"])[1]:
            an.A.unify(o[0], xd[1])
        else:
            an.A.fix_dims(o, "norm statistics")
    affine = isinstance(node.args[1], fx.Node)
    an.mac_terms.append((node, list(xd), fvcore_norm_macs("batch_norm", affine)))  # fvcore: eval


@_rule(aten.native_layer_norm.default)
def _r_ln(an, node):
    x, nshape = node.args[:2]
    xd, outs = an.dims(x), node.meta["split_dims"]
    an.same(x, outs[0])
    k = len(nshape)
    for p in node.args[2:4]:
        if isinstance(p, fx.Node):
            for pd, d in zip(an.dims(p), xd[-k:]):
                an.A.unify(pd, d)
    for o in outs[1:]:
        for y, d in zip(o[:-k], xd[:-k]):
            an.A.unify(y, d)
        an.A.fix_dims(o[-k:], "norm statistics")
    an.mac_terms.append((node, list(xd), fvcore_norm_macs("layer_norm", isinstance(node.args[2], fx.Node))))


@_rule(aten.native_group_norm.default)
def _r_gn(an, node):
    x, w, b = node.args[:3]
    groups = node.args[6]  # native_group_norm(input, weight, bias, N, C, HxW, group, eps)
    xd, outs = an.dims(x), node.meta["split_dims"]
    an.same(x, outs[0])
    for p in (w, b):
        if isinstance(p, fx.Node):
            an.A.unify(an.dims(p)[0], xd[1])
    if groups > 1:
        g = an.A.new(groups, True, "GroupNorm num_groups")
        an.A.unify(xd[1], (g, an.A.new(shape_of(x.meta["val"])[1] // groups)))
    for o in outs[1:]:
        an.A.fix_dims(o, "norm statistics")
    an.mac_terms.append((node, list(xd), fvcore_norm_macs("group_norm", isinstance(w, fx.Node))))


def _reduce(an, node, dims_arg, keepdim):
    x = node.args[0]
    xd = an.dims(x)
    rank = len(xd)
    if dims_arg is None or (isinstance(dims_arg, (list, tuple)) and len(dims_arg) == 0):
        red = set(range(rank))
    else:
        dl = dims_arg if isinstance(dims_arg, (list, tuple)) else [dims_arg]
        red = {norm_dim(d, rank) for d in dl}
    kept = [d for k, d in enumerate(xd) if k not in red]
    outs = node.meta["split_dims"]
    outs = outs if isinstance(node.meta["val"], (tuple, list)) else [outs]
    for o in outs:
        if keepdim:
            o = [d for k, d in enumerate(o) if k not in red]
        for a, b in zip(kept, o):
            an.A.unify(a, b)


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


@_rule(*_REDUCTIONS)
def _r_reduce(an, node):
    i = _REDUCTIONS[node.target]
    _reduce(an, node, _arg(node, i, "dim"), bool(_arg(node, i + 1, "keepdim", False)))


@_rule(aten.mean.default, aten.sum.default, aten.max.default, aten.min.default)
def _r_reduce_all(an, node):
    pass  # reduces to a scalar: nothing to unify


def _pool(an, node, nspatial):
    x = node.args[0]
    name = getattr(node.target, "__name__", "").split(".")[0]
    if name in FVCORE_PER_OUTPUT:  # the elementwise ops fvcore's default table counts
        an.mac_terms.append((node, list(node.meta["split_dims"]), FVCORE_PER_OUTPUT[name]))
    elif name in FVCORE_PER_INPUT:
        an.mac_terms.append((node, list(an.dims(x)), FVCORE_PER_INPUT[name]))
    xd = an.dims(x)
    lead = len(xd) - nspatial
    outs = node.meta["split_dims"]
    outs = outs if isinstance(node.meta["val"], (tuple, list)) else [outs]
    for i, o in enumerate(outs):
        for a, b in zip(xd[:lead], o[:lead]):
            an.A.unify(a, b)
        if i == 0:
            _spatial(an, x, node, list(xd[lead:]), list(o[lead:]))
        else:
            an.A.fix_dims(o[lead:], "spatial")


def _spatial(an, x, node, xd, od):
    """Spatial dims: a length-preserving op (stride 1, same padding) works at any length, so in ~ out (ECA runs
    a conv1d along the channels); any other spatial dim is fixed (image sides come fixed from the input)."""
    xs = shape_of(x.meta["val"])[-len(xd):] if xd else ()
    val = node.meta["val"]
    os_ = shape_of(val if isinstance(val, torch.Tensor) else val[0])[-len(od):] if od else ()
    for a, b, m, n in zip(xd, od, xs, os_):
        if m == n:
            an.A.unify(a, b, "length-preserving spatial op")
        else:
            an.A.fix_dims([a, b], "spatial")


for _op, _n in [("avg_pool1d", 1), ("avg_pool2d", 2), ("avg_pool3d", 3), ("max_pool2d_with_indices", 2),
                ("max_pool1d_with_indices", 1), ("max_pool3d_with_indices", 3), ("adaptive_max_pool2d", 2),
                ("adaptive_max_pool1d", 1), ("_adaptive_avg_pool2d", 2), ("_adaptive_avg_pool3d", 3),
                ("adaptive_avg_pool1d", 1), ("upsample_nearest2d", 2), ("upsample_bilinear2d", 2),
                ("upsample_bicubic2d", 2), ("_upsample_bicubic2d_aa", 2), ("_upsample_bilinear2d_aa", 2),
                ("upsample_nearest1d", 1), ("upsample_linear1d", 1), ("_upsample_nearest_exact2d", 2),
                ("reflection_pad2d", 2), ("replication_pad2d", 2), ("reflection_pad1d", 1),
                ("replication_pad1d", 1), ("max_pool2d", 2), ("avg_pool2d_backward", 2),
                ("pixel_shuffle", 0), ("grid_sampler_2d", 2)]:
    _pkt = getattr(aten, _op, None)
    if _pkt is not None and _n:
        RULES[_pkt] = (lambda n: (lambda an, node: _pool(an, node, n)))(_n)


@_rule(aten.constant_pad_nd.default)
def _r_pad(an, node):
    x, pad = node.args[:2]
    xd, od = an.dims(x), node.meta["split_dims"]
    rank = len(xd)
    for k in range(rank):
        j = rank - 1 - k  # pad lists the last dim first
        p = pad[2 * k:2 * k + 2] if 2 * k < len(pad) else (0, 0)
        if any(p):
            an.A.fix_dims([xd[j], od[j]], "padded dim")
        else:
            an.A.unify(xd[j], od[j])


def _columns(an, node, kernel, why: str, unfold: bool):
    """``im2col`` (``unfold``) / ``col2im``: the column dim is ``C x k x k`` with a fixed kernel factor."""
    xd, od = an.dims(node.args[0]), node.meta["split_dims"]
    an.A.unify(xd[0], od[0])
    image, cols = (xd, od) if unfold else (od, xd)
    an.A.unify(tuple(image[1]) + (an.A.new(math.prod(kernel), True, why),), cols[1])
    an.A.fix_dims([cols[2]] + list(image[2:]), "spatial")


@_rule(aten.im2col.default)
def _r_im2col(an, node):
    _columns(an, node, node.args[1], "unfold kernel", unfold=True)


@_rule(aten.col2im.default)
def _r_col2im(an, node):
    _columns(an, node, node.args[2], "fold kernel", unfold=False)


@_rule(aten.index.Tensor)
def _r_index(an, node):
    x, indices = node.args[:2]
    xd, od = an.dims(x), node.meta["split_dims"]
    idx = [i for i, t in enumerate(indices) if t is not None]
    for i in idx:
        an.A.fix_dims([xd[i]], "indexed dim")
    an.A.fix_dims(od, "index result") if len(idx) != 1 else None
    if len(idx) == 1:
        k = idx[0]
        ish = shape_of(indices[k].meta["val"])
        before, after = xd[:k], xd[k + 1:]
        for a, b in zip(before, od[:k]):
            an.A.unify(a, b)
        an.A.fix_dims(od[k:k + len(ish)], "index result")
        for a, b in zip(after, od[k + len(ish):]):
            an.A.unify(a, b)
    for t in indices:
        if isinstance(t, fx.Node):
            an.A.fix_dims(an.dims(t), "index tensor")


@_rule(aten.index_select.default)
def _r_index_select(an, node):
    x, dim = node.args[:2]
    xd, od = an.dims(x), node.meta["split_dims"]
    dim = norm_dim(dim, len(xd))
    an.A.fix_dims([xd[dim], od[dim]], "indexed dim")
    an.same(x, od, skip=(dim,))


def _sdpa(an, node):
    q, k, v = node.args[:3]
    qd, kd, vd = an.dims(q), an.dims(k), an.dims(v)
    outs = node.meta["split_dims"]
    od = outs if isinstance(node.meta["val"], torch.Tensor) else outs[0]
    nb = len(qd) - 2
    for i in range(nb):
        for d in (kd, vd, od):
            an.A.unify(qd[i], d[i])
    an.heads.append((list(qd[:nb]), [qd[-1], vd[-1]]))
    an.A.unify(qd[-1], kd[-1])
    an.A.unify(kd[-2], vd[-2])
    an.A.unify(qd[-2], od[-2])
    an.A.unify(vd[-1], od[-1])
    an.mac_terms.append((node, list(qd) + [kd[-2]], 1.0))
    an.mac_terms.append((node, list(qd[:-1]) + [kd[-2], vd[-1]], 1.0))
    if not isinstance(node.meta["val"], torch.Tensor):
        for o in outs[1:]:
            an.A.fix_dims(o, "attention statistics")


for _name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"):
    if hasattr(aten, _name):
        RULES[getattr(aten, _name)] = _sdpa

for _name in ("empty", "zeros", "ones", "full", "arange", "eye", "rand", "randn", "scalar_tensor",
              "empty_strided", "linspace", "randint"):
    if hasattr(aten, _name):  # fresh dims, tied only to the sizes the module read from its input
        RULES[getattr(aten, _name)] = (lambda an, node: an.couple_to_module_inputs(node))
