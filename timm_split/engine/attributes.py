"""Width attributes: find the module attributes that hold channel widths, and settle the ambiguous ones.

Torch's layers (``Conv*``, ``Linear``, norms, ``Embedding``) get theirs from their new parameter shapes. Any
other int attribute (``num_features``, ``embed_dim``, ``head_dim``, ``expand_chs``...) is rewritten when its
value equals the old width of a channel group local to its module (its own parameters, what it is called with,
ops run by it or by its direct children) and that width has one new value. No attribute names are keyed by
model. Where a value is ambiguous (ViT's ``attn_dim`` = heads x head_dim = embed_dim), the module is run alone
on meta inputs of the planned shapes with each candidate (:func:`settle_attributes`).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from itertools import chain
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..trace import MetaRecurrent
from .analyse import ChannelGraph
from .atoms import NewWidths
from .rules import EQUAL_SPLITS
from .tables import source_dim, table_layout

_logger = logging.getLogger(__name__)

__all__ = ["width_attributes", "attribute_ties", "module_io", "settle_attributes", "fit_module",
           "regularization_updates", "DROP_ATTRS"]

Ambiguous = Tuple[Tuple[str, str, object, tuple], ...]  # (module path, attribute, old value, candidates)


DROP_ATTRS = ("drop_rate", "drop_path_rate", "drop_prob", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
              "path_drop_rate", "drop_block_rate")
# never widths: flags, and the patch geometry timm's embeddings keep (a 16 x 16 grid matched by value to 16 RoPE
# bands or a head_dim of 16 is still the grid; timm's checkpoint filters resample position tables to it)
_SKIP_ATTRS = {"training", "inplace", "img_size", "grid_size", "patch_size", "num_patches"}


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _scopes(cg: ChannelGraph) -> Tuple[Dict[str, List], Dict[str, List]]:
    """The dims each module sees: its parameters and buffers, what it is called with, and what the ops in it
    (or in its children) produce; and separately the dims of its own parameters and buffers."""
    scopes: Dict[str, List] = {}
    own: Dict[str, List] = {}
    for name, dims in cg.param_dims.items():
        scopes.setdefault(_parent(name), []).extend(dims)
        own.setdefault(_parent(name), []).extend(dims)
    for path, (args, _, kwargs) in cg.trace.calls.items():  # what a module is called with belongs to its scope
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                scopes.setdefault(path, []).extend(a.meta.get("split_dims") or [])
    for node in cg.trace.graph.nodes:
        st = node.meta.get("nn_module_stack") or []
        if node.op == "output":  # what the model returns belongs to the model's scope
            scopes.setdefault("", []).extend(d for a in node.all_input_nodes for d in a.meta.get("split_dims") or [])
        if not st or node.op != "call_function":
            continue
        dims = node.meta.get("split_dims") or []
        flat = dims if isinstance(node.meta.get("val"), torch.Tensor) else [d for o in dims for d in o]
        if node.target in EQUAL_SPLITS:  # ``x.split(self.expand_chs // 2)``: the whole being split is in scope too
            flat = list(flat) + list(node.args[0].meta.get("split_dims") or [])
        for path in {st[-1], _parent(st[-1])} | ({st[-2]} if len(st) > 1 else set()):
            scopes.setdefault(path, []).extend(flat)
    return scopes, own


def attribute_ties(cg: ChannelGraph, ambiguous: Sequence[Tuple[str, str, object, tuple]]) -> int:
    """Make the channel groups behind each ambiguous attribute one group, in place (``cg.atoms``).

    A module that keeps one width in one attribute (``val_dim`` of every head of a cascaded attention) needs
    the groups of that old width in its scope to stay equal; the first plan does not know that.

    Returns:
        How many groups were merged away.
    """
    A, scopes, merged = cg.atoms, _scopes(cg)[0], 0
    for path, _, old, _ in ambiguous:
        roots = {A.find(d[0]) for d in scopes.get(path, ()) if len(d) == 1 and A.size[d[0]] == old}
        roots = sorted(r for r in roots if not A.fixed[r] and r not in A.prod and r not in A.sum)
        for r in roots[1:]:
            A.union(roots[0], r)
            merged += 1
    return merged


def _size_table(cg: ChannelGraph, sizes: NewWidths, dims_of: Dict[str, List]) -> Dict[str, Dict[int, set]]:
    """Per module, old width -> the new widths it takes, over the given dims and their factors."""
    A = cg.atoms
    out: Dict[str, Dict[int, set]] = {}
    for path, dims in dims_of.items():
        m = out.setdefault(path, {})
        for dim in dims:
            m.setdefault(A.dim_size(dim), set()).add(sizes.dim(dim))
            for r in A.leaves(dim):
                m.setdefault(A.size[r], set()).add(sizes.atom(r))
    return out


def _split_sections(cg: ChannelGraph, sizes: NewWidths) -> Dict[str, Dict[tuple, set]]:
    """Per module, the split sizes it passes to ``split_with_sizes`` -> their planned piece widths."""
    sections: Dict[str, Dict[tuple, set]] = {}
    for node in cg.trace.graph.nodes:
        st = node.meta.get("nn_module_stack") or []
        if node.target is not torch.ops.aten.split_with_sizes.default or not st:
            continue
        old = tuple(node.args[1])
        rank = len(node.args[0].meta["val"].shape)
        d = (node.args[2] if len(node.args) > 2 else 0) % rank
        new = tuple(sizes.dim(piece[d]) for piece in node.meta["split_dims"])
        for path in {st[-1], _parent(st[-1])} | ({st[-2]} if len(st) > 1 else set()):
            sections.setdefault(path, {}).setdefault(old, set()).add(new)
    return sections


def _conv_groups(cg: ChannelGraph, sizes: NewWidths) -> Dict[str, int]:
    """Per conv module, its planned ``groups``."""
    out = {}
    for node in cg.trace.graph.nodes:
        g = cg.groups_atoms.get(node.name)
        st = node.meta.get("nn_module_stack") or []
        if g is not None and st:
            out[st[-1]] = sizes.atom(g)
    return out


class _Scope:
    """What one module's attributes are matched against: ``local`` old width -> new widths, ``mapping`` the
    unique ones, ``sections`` its split sizes, ``own`` the widths of its own tensors, ``called`` whether the
    trace recorded a call of it (so it can be run alone to settle a candidate)."""

    def __init__(self, local: Dict[int, set], sections: Dict[tuple, set], own: Dict[int, set], called: bool):
        self.local, self.sections, self.own, self.called = local, sections, own, called
        self.mapping = {o: next(iter(n)) for o, n in local.items() if len(n) == 1}


def _int_update(v: int, sc: _Scope) -> Optional[Tuple[str, object]]:
    """An int attribute's update from the widths in scope: ``('ambiguous', candidates)``, ``('set', value)`` or
    None (not decided here). A size passed to split_with_sizes in this module names its piece: a candidate where
    the old width is ambiguous, the value where the module's tensors do not show it at all."""
    m = sc.local
    piece = {n[i] for o, ns in sc.sections.items() for n in ns for i, e in enumerate(o) if e == v}
    cands = m.get(v, set()) | piece if len(m.get(v, ())) > 1 or v not in m else set()
    if len(cands) > 1:
        return "ambiguous", tuple(sorted(cands | {v}))
    if cands and cands != {v}:
        return "set", cands.pop()
    return None


def _attribute_update(attr: str, v, sc: _Scope) -> Optional[Tuple[str, object]]:
    """The update of one attribute: ``('ambiguous', candidates)``, ``('set', new value)`` or None."""
    m = sc.local
    if type(v) is int and v > 1:
        decided = _int_update(v, sc)
        if decided is not None:
            return decided
    ints = isinstance(v, (tuple, list)) and all(type(e) is int for e in v)
    cut = sc.sections.get(tuple(v), ()) if ints else ()
    if ints and not cut and v and any(e > 1 and len(m.get(e, ())) > 1 for e in v):
        # a shape tuple with an ambiguous width (RmsNorm's normalized_shape where 1,024 is both the width and
        # the token count): try each combination
        opts = [sorted(m[e] | {e}) if e > 1 and len(m.get(e, ())) > 1 else [sc.mapping.get(e, e)] for e in v]
        return "ambiguous", tuple(type(v)(c) for c in itertools.islice(itertools.product(*opts), 16))
    nv = type(v)(next(iter(cut))) if len(cut) == 1 else _map_value(attr, v, sc.mapping)
    if nv is None and isinstance(v, int) and v not in m:
        nv = _multiple_of_own(v, sc.own)
    if nv is None or nv == v:
        return None
    if ints and not cut and sc.called:
        # a tuple of sizes matched by value may be geometry (a window of 16 x 16 beside 16 heads): the module is
        # run with both to see which gives the planned shapes
        return "ambiguous", (nv, v)
    return "set", nv


def width_attributes(cg: ChannelGraph, sizes: NewWidths) -> Tuple[tuple, Ambiguous]:
    """Find the module attributes that hold channel widths, and their new values.

    Args:
        cg: the analysis.
        sizes: new width of every atom under the plan.

    Returns:
        ((module path, attribute, old value, new value) for every attribute that changes,
         (module path, attribute, old value, candidates) where the old value maps to several widths).
    """
    scopes, own_dims = _scopes(cg)
    local, own = _size_table(cg, sizes, scopes), _size_table(cg, sizes, own_dims)
    sections, conv_groups = _split_sections(cg, sizes), _conv_groups(cg, sizes)
    out: List[Tuple[str, str, object, object]] = []
    ambiguous: List[Tuple[str, str, object, tuple]] = []
    for path, mod in cg.trace.model.named_modules(remove_duplicate=False):
        exact = _layer_attributes(path, mod, conv_groups.get(path), sizes, cg)
        out.extend(exact or ())
        derived = _table_attributes(path, mod, sizes, cg)
        out.extend(a for a in derived if a[2] != a[3])
        if not local.get(path):
            continue
        sc = _Scope(local[path], sections.get(path, {}), own.get(path, {}), path in cg.trace.calls)
        skip = (_EXACT_ATTRS.get(type(mod), ()) if exact is not None else ()) + tuple(a[1] for a in derived)
        for attr, v in list(vars(mod).items()):
            if attr.startswith("_") or attr in _SKIP_ATTRS or attr in skip:
                continue
            update = _attribute_update(attr, v, sc)
            if update is not None:
                (ambiguous if update[0] == "ambiguous" else out).append((path, attr, v, update[1]))
    return tuple(out), tuple(ambiguous)


def _table_attributes(path: str, mod: nn.Module, sizes: NewWidths, cg: ChannelGraph) -> list:
    """The attributes a computed table is made from (:mod:`~timm_split.engine.tables`), from the new widths of
    its source buffers (RoPE's ``dim = 4 * bands``); every one, changed or not, so no match overrides it."""
    layout = table_layout(mod)
    out = []
    for attr, factor, multiple in getattr(layout, "attributes", ()):
        dim = source_dim(path, factor, cg.param_dims)
        if dim is not None:
            out.append((path, attr, getattr(mod, attr), multiple * sizes.dim(dim)))
    return out


def module_io(cg: ChannelGraph, sizes: NewWidths, paths) -> Dict[str, tuple]:
    """Per module path, its planned call: (input specs, output shapes, keyword specs), where a spec is
    ``('tensor', shape, dtype)`` or ``('value', v)``; what :func:`settle_attributes` runs it with."""
    def shape(n):
        return tuple(sizes.dim(d) for d in n.meta["split_dims"])

    def spec(a):
        return ("tensor", shape(a), a.meta["val"].dtype) if isinstance(a, torch.fx.Node) else ("value", a)

    io = {}
    for path in paths:
        args, outs, kwargs = cg.trace.calls.get(path, ([], [], {}))
        io[path] = ([spec(a) for a in args], [shape(o) for o in outs if o is not None],
                    {k: spec(a) for k, a in kwargs.items()})
    return io


def _multiple_of_own(v: int, own: Dict[int, set]) -> Optional[int]:
    """A size a module keeps as a small multiple of one of its own tensors' widths (rotary embeddings keep
    ``dim`` and a ``periods`` buffer of ``dim // 4``): scaled with that width where exactly one width fits."""
    if isinstance(v, bool) or v < 16:
        return None
    fits = {k * next(iter(n)) for o, n in own.items() for k in (2, 4) if o >= 8 and v == k * o and len(n) == 1}
    return fits.pop() if len(fits) == 1 else None


_CONV_ATTRS = ("in_channels", "out_channels", "groups")
_EXACT_ATTRS = {}  # filled lazily: type -> attributes that _layer_attributes sets exactly


def _layer_attributes(path: str, mod: nn.Module, groups: Optional[int], sizes: NewWidths, cg: ChannelGraph):
    """Width attributes of torch's own layers, computed from their new parameter shapes (not matched)."""
    def shape(leaf):
        dims = cg.param_dims.get(f"{path}.{leaf}" if path else leaf)
        return None if dims is None else tuple(sizes.dim(d) for d in dims)

    new = {}
    if isinstance(mod, nn.modules.conv._ConvNd) and shape("weight"):
        w = shape("weight")
        g = groups if groups is not None else mod.groups
        new = dict(groups=g, in_channels=w[0] if mod.transposed else w[1] * g,
                   out_channels=w[1] * g if mod.transposed else w[0])
    elif isinstance(mod, nn.Linear) and shape("weight"):
        w = shape("weight")
        new = dict(in_features=w[1], out_features=w[0])
    elif isinstance(mod, nn.modules.batchnorm._NormBase) and (shape("weight") or shape("running_mean")):
        new = dict(num_features=(shape("weight") or shape("running_mean"))[0])
    elif isinstance(mod, nn.LayerNorm) and shape("weight"):
        new = dict(normalized_shape=tuple(shape("weight")))
    elif isinstance(mod, nn.GroupNorm) and shape("weight"):  # the group count is fixed by the analysis
        new = dict(num_channels=shape("weight")[0], num_groups=mod.num_groups)
    elif isinstance(mod, nn.Embedding) and shape("weight"):
        new = dict(num_embeddings=shape("weight")[0], embedding_dim=shape("weight")[1])
    else:
        return None
    _EXACT_ATTRS[type(mod)] = tuple(new)
    return [(path, k, getattr(mod, k), v) for k, v in new.items() if getattr(mod, k) != v]


def _map_value(attr: str, v, mapping: Dict[int, int]):
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return mapping.get(v) if v > 1 else None
    if isinstance(v, float) and "scale" in attr and v > 0:
        for o, n in mapping.items():
            if o > 1 and n != o and math.isclose(v, o ** -0.5, rel_tol=1e-6):
                return n ** -0.5
        return None
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        nv = [mapping.get(e, e) if e > 1 else e for e in v]
        return type(v)(nv) if nv != list(v) else None
    return None


DROP_SCALES = ("S", "sqrt")


def drop_divisor(split_factor: int, drop_scale: str) -> float:
    """What dropout and drop-path rates are divided by: S (``'S'``, SplitNet's ResNet rule) or sqrt(S)
    (``'sqrt'``, the seed's rule for SE-ResNet, EfficientNet, PyramidNet and DenseNet)."""
    if drop_scale not in DROP_SCALES:
        raise ValueError(f"drop_scale must be one of {DROP_SCALES}, got {drop_scale!r}")
    return float(split_factor) if drop_scale == "S" else math.sqrt(split_factor)


def regularization_updates(model: nn.Module, split_factor: int,
                           drop_scale: str = "S") -> Tuple[Tuple[str, str, float, float], ...]:
    """Dropout and drop-path rates divided by S or sqrt(S) (:func:`drop_divisor`): nn.Dropout ``p``, timm
    DropPath ``drop_prob`` and ``*drop*_rate``."""
    div = drop_divisor(split_factor, drop_scale)
    out = []
    for path, mod in model.named_modules():
        for attr in ("p",) if isinstance(mod, nn.modules.dropout._DropoutNd) else DROP_ATTRS:
            v = getattr(mod, attr, None) if attr in vars(mod) else None
            if isinstance(v, float) and v > 0:
                out.append((path, attr, v, v / div))
    return tuple(out)


def settle_attributes(member_meta: nn.Module, plan, ambiguous: Ambiguous, io: Dict[str, tuple],
                      max_tries: int = 64):
    """Settle the ambiguous attributes of a plan by running each such module alone on meta tensors.

    Modules are tried deepest first. For each, every combination of candidate values is set until the
    module, fed the planned input shapes, returns the planned output shapes (:func:`fit_module`). The chosen
    values join ``plan.attributes``; where none fits, the old values stay and the member check reports the
    failure. Identical modules fed identical shapes (every ViT block) reuse the first one's answer.

    Args:
        member_meta: a meta member built from ``plan`` (it is updated in place).
        plan: the :class:`~timm_split.engine.plan.SplitPlan`.
        ambiguous: (module path, attribute, old value, candidates), from :func:`width_attributes`.
        io: the planned calls of those modules, from :func:`module_io`.
        max_tries: cap on combinations per module.

    Returns:
        The plan with ``attributes`` completed.
    """
    if not ambiguous:
        return plan
    mods = dict(member_meta.named_modules(remove_duplicate=False))
    by_mod: Dict[str, List[Tuple[str, object, tuple]]] = {}
    for path, attr, old, cands in ambiguous:
        by_mod.setdefault(path, []).append((attr, old, cands))
    chosen = []
    fits: Dict[tuple, tuple] = {}  # identical modules fed identical shapes settle the same way (ViT blocks)
    for path in sorted(by_mod, key=lambda p: -p.count(".") if p else 1):
        mod, entries = mods[path], by_mod[path]
        args_spec, out_shapes, kwargs_spec = io.get(path, ([], [], {}))
        key = (_signature(mod), repr(entries), repr(args_spec), repr(out_shapes), repr(kwargs_spec))
        fit = fits.get(key)
        if key not in fits:
            make = lambda a: torch.empty(a[1], dtype=a[2], device="meta") if a[0] == "tensor" else a[1]  # noqa: E731
            args, kwargs = [make(a) for a in args_spec], {k: make(a) for k, a in kwargs_spec.items()}
            fit = fit_module(mod, entries, args, kwargs, [tuple(s) for s in out_shapes], max_tries)
        if fit is None:
            fit = tuple(old for _, old, _ in entries)
            _logger.debug("no candidate fits the attributes of %s; keeping %s", path, fit)
        fits[key] = fit
        for (attr, old, _), v in zip(entries, fit):
            setattr(mod, attr, v)
            if v != old:
                chosen.append((path, attr, old, v))
    return dataclasses.replace(plan, attributes=plan.attributes + tuple(chosen))


def fit_module(mod: nn.Module, entries: list, args: list, kwargs: dict, out_shapes: list,
               max_tries: int = 64) -> Optional[tuple]:
    """The first combination of candidate values with which ``mod(*args, **kwargs)`` gives ``out_shapes``, or None.

    Every run records which of the attributes the forward reads; only those are varied (one it never reads
    cannot change its output), and the set grows as other values reach other code. A whole encoder with four
    ambiguous attributes, one of them read, takes 4 forwards instead of 32.

    Args:
        mod: the module (on meta); its attributes are left at the last combination tried.
        entries: (attribute, old value, candidate values) per attribute.
        args: positional inputs (meta tensors of the planned shapes, or values).
        kwargs: keyword inputs.
        out_shapes: the planned shapes of its tensor outputs, flattened.
        max_tries: cap on combinations.

    Returns:
        The fitting values, one per entry, or None.
    """
    names, read = {attr for attr, _, _ in entries}, set()

    def spy(self, k):
        if k in names:
            read.add(k)
        return object.__getattribute__(self, k)

    cls = type(mod)
    spying = type(cls.__name__, (cls,), {"__getattribute__": spy})

    def attempt(combo):
        for (attr, _, _), v in zip(entries, combo):
            setattr(mod, attr, v)
        mod.__class__ = spying
        try:
            with torch.no_grad(), MetaRecurrent():
                out = mod(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a wrong candidate fails in any way
            return None
        finally:
            mod.__class__ = cls
        return [tuple(o.shape) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]

    tried: set = set()
    live: set = set()
    while len(tried) < max_tries:
        pools = [c if attr in live else c[:1] for attr, _, c in entries]
        for combo in itertools.product(*pools):
            if repr(combo) in tried:  # candidates may be lists: not hashable
                continue
            if len(tried) >= max_tries:
                return None
            tried.add(repr(combo))
            if attempt(combo) == out_shapes:
                return combo
            if read - live:
                break  # the forward reached another attribute: vary it too
        else:
            return None  # every combination of the attributes it reads was tried
        live |= read
    return None


_PLAIN = (int, float, bool, str, type(None))


def _signature(mod: nn.Module) -> tuple:
    """What a module's forward can depend on, short of its code: its class and, for it and every submodule,
    the plain attributes (ints, floats, strings and tuples of them) and the tensor shapes and dtypes."""
    def plain(v):
        return isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v))

    sig = []
    for path, m in mod.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and plain(v)))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in chain(m._parameters.items(), m._buffers.items())
                        if t is not None)
        sig.append((path, type(m), attrs, tensors))
    return tuple(sig)
