"""Stage 2, analyse: find the channel groups, the sets of tensor dimensions that must change width together.

Every dimension of every tensor in the traced graph is a product of *atoms*. Atoms live in a union-find:
two atoms in one class always have the same width. An atom can be *refined* into a product of atoms (a
reshape of ``3*C`` into ``3 x heads x head_dim``, a grouped conv's ``C = groups x C/groups``) or into a sum of
dimensions (``cat`` and ``split`` along channels). An atom is *fixed* when its width must not change: the
image channels, batch, spatial and token dims, the classes, attention heads (head_dim shrinks instead),
the group count of a grouped conv, and anything an op rule cannot prove safe. Fixing is always safe; it only
costs parity, which the planner then recovers elsewhere.

The propagation is an interpreter over the graph: each op's rule unifies the atoms of its inputs and
outputs, and writes the output dims into ``node.meta['split_dims']``.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .errors import SplitError
from .trace import Trace

_logger = logging.getLogger(__name__)
aten = torch.ops.aten

__all__ = ["Atoms", "ChannelGraph", "analyse"]

Dim = Tuple[int, ...]  # a dimension: the product of these atoms


class Atoms:
    """Union-find over atoms, with multiplicative and additive refinement and a fixed flag per class."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.fixed: List[bool] = []
        self.prod: Dict[int, Tuple[int, ...]] = {}  # root -> ordered factor atoms
        self.sum: Dict[int, Tuple[Dim, ...]] = {}  # root -> summand dims
        self.why: Dict[int, str] = {}

    def new(self, size: int, fixed: bool = False, why: str = "") -> int:
        """A fresh atom of ``size``; size-1 atoms are always fixed."""
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.fixed.append(bool(fixed) or size <= 1)
        if fixed and why:
            self.why[i] = why
        return i

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def fix(self, a: int, why: str = "") -> None:
        """Fix an atom's class and everything it is refined into."""
        todo = [a]
        while todo:
            r = self.find(todo.pop())
            if self.fixed[r] and r not in self.prod and r not in self.sum:
                continue
            if not self.fixed[r]:
                self.fixed[r] = True
                if why:
                    self.why.setdefault(r, why)
            elif r in self.why or not why:
                pass
            todo.extend(self.prod.get(r, ()))
            for d in self.sum.get(r, ()):
                todo.extend(d)
            # refined-and-fixed atoms are expanded once; drop the refinement to stop revisiting
            self.prod.pop(r, None)
            self.sum.pop(r, None)

    def fix_dims(self, dims: Sequence[Dim], why: str) -> None:
        for d in dims:
            for a in d:
                self.fix(a, why)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        assert self.size[ra] == self.size[rb], (self.size[ra], self.size[rb])
        self.parent[rb] = ra
        fixed = self.fixed[ra] or self.fixed[rb]
        if (ra in self.prod and rb in self.sum and self.sum_to_prod(rb)) or (
                rb in self.prod and ra in self.sum and self.sum_to_prod(ra)):
            pass  # the concatenation became a product; the two products are unified below
        pa, pb = self.prod.pop(ra, None), self.prod.pop(rb, None)
        sa, sb = self.sum.pop(ra, None), self.sum.pop(rb, None)
        self.fixed[ra] = fixed
        if ra not in self.why and rb in self.why:
            self.why[ra] = self.why[rb]
        if (pa or pb) and (sa or sb):  # one side a product, the other a sum: no common structure
            self.fixed[ra] = True
            for d in (pa or pb or (),):
                for x in d:
                    self.fix(x, "product and sum refinements meet")
            for s in sa or sb or ():
                for x in s:
                    self.fix(x, "product and sum refinements meet")
            return
        if pa and pb:
            self.prod[ra] = pa
            self.unify(pa, pb)
        elif pa or pb:
            self.prod[ra] = pa or pb
        elif sa and sb:
            if [self.dim_size(d) for d in sa] == [self.dim_size(d) for d in sb]:
                self.sum[ra] = sa
                for x, y in zip(sa, sb):
                    self.unify(x, y)
            else:
                self.fixed[ra] = True
                for s in sa + sb:
                    for x in s:
                        self.fix(x, "cat/split boundaries differ")
                return
        elif sa or sb:
            self.sum[ra] = sa or sb
        if fixed:
            self.fix(ra)

    def sum_to_prod(self, r: int) -> bool:
        """Rewrite a concatenation of k equal-width pieces as the product ``[k, piece]`` (the same row-major
        layout), tying the pieces' widths; or of pieces ``[h_i, *inner]`` as ``[sum h_i, *inner]``. Used only
        where a reshape needs the product view (qkv biases that are ``cat(q_bias, k_bias, v_bias)`` and then
        viewed as ``3 x heads x head_dim``)."""
        r = self.find(r)
        parts = self.sum.get(r)
        if not parts:
            return False
        # whole heads concatenated, ``[h1, hd] + [h2, hd] = [h1 + h2, hd]`` (CoaT's per-window head splits)
        leaves = [[self.find(a) for a in self.leaves(d)] for d in parts]
        if all(len(lv) > 1 and lv[1:] == leaves[0][1:] for lv in leaves):
            del self.sum[r]
            self.prod[r] = (self.make_sum([(lv[0],) for lv in leaves])[0], *leaves[0][1:])
            return True
        if len({self.dim_size(d) for d in parts}) != 1:
            return False
        for d in parts[1:]:
            self.unify(parts[0], d, "equal cat pieces")
        del self.sum[r]
        k = self.new(len(parts), fixed=True, why="cat of equal pieces")
        rest = self.new(self.dim_size(parts[0]), fixed=self.fixed[r])
        self.unify((rest,), parts[0], "equal cat pieces")
        self.prod[r] = (k, rest)
        return True

    def dim_size(self, d: Dim) -> int:
        return math.prod(self.size[self.find(a)] for a in d)

    def any_free(self, d: Dim) -> bool:
        """Whether some factor of the dim ``d`` can change width."""
        return any(not self.fixed[r] for r in self.leaves(d))

    def all_free(self, d: Dim) -> bool:
        """Whether every factor of the dim ``d`` can change width."""
        return not any(self.fixed[r] for r in self.leaves(d))

    def leaves(self, d: Dim) -> List[int]:
        """The finest known product factors of a dim (roots), size-1 atoms dropped."""
        out: List[int] = []
        todo = list(reversed(d))
        while todo:
            r = self.find(todo.pop())
            if r in self.prod:
                todo.extend(reversed(self.prod[r]))
            elif self.size[r] != 1:
                out.append(r)
        return out

    def refine(self, a: int, sizes: Sequence[int]) -> List[int]:
        """Refine the (unrefined) atom ``a`` into a product of new atoms of ``sizes``."""
        r = self.find(a)
        assert r not in self.prod and math.prod(sizes) == self.size[r]
        kids = tuple(self.new(s, fixed=self.fixed[r]) for s in sizes)
        if r in self.sum:  # an additive atom cannot also be split multiplicatively
            self.fix(r, "reshape of a concatenated dim")
            kids = tuple(self.new(s, fixed=True) for s in sizes)
        self.prod[r] = kids
        return list(kids)

    def unify(self, da: Sequence[int], db: Sequence[int], why: str = "reshape") -> None:
        """Make two atom products (of equal total size) equal, factor by factor, row-major."""
        la, lb = self.leaves(tuple(da)), self.leaves(tuple(db))
        i = j = 0
        while i < len(la) and j < len(lb):
            a, b = self.find(la[i]), self.find(lb[j])
            if a in self.prod or b in self.prod:  # refined by an earlier union in this walk
                la[i:i + 1], lb[j:j + 1] = self.leaves((a,)), self.leaves((b,))
                continue
            sa, sb = self.size[a], self.size[b]
            if a == b or sa == sb:
                self.union(a, b)
                i += 1
                j += 1
            elif sa < sb and sb % sa == 0 and (b not in self.sum or self.sum_to_prod(b)):
                lb[j:j + 1] = self.leaves((b,)) if b in self.prod else self.refine(b, (sa, sb // sa))
            elif sb < sa and sa % sb == 0 and (a not in self.sum or self.sum_to_prod(a)):
                la[i:i + 1] = self.leaves((a,)) if a in self.prod else self.refine(a, (sb, sa // sb))
            else:  # the factorings interleave: fix the smallest block where both products agree, go on
                pa, pb, i0, j0 = sa, sb, i, j
                i, j = i + 1, j + 1
                while pa != pb and i <= len(la) and j <= len(lb):
                    if pa < pb and i < len(la):
                        pa *= self.size[self.find(la[i])]
                        i += 1
                    elif pb < pa and j < len(lb):
                        pb *= self.size[self.find(lb[j])]
                        j += 1
                    else:
                        break
                if pa != pb:
                    i, j = len(la), len(lb)
                for x in la[i0:i] + lb[j0:j]:
                    self.fix(x, f"{why}: factors do not align")
        for x in la[i:] + lb[j:]:  # sizes disagree (should not happen): be safe
            self.fix(x, f"{why}: size mismatch")

    def split_sum(self, d: Dim, sizes: Sequence[int]) -> List[Dim]:
        """Split a dim additively into pieces of ``sizes``; reuse a matching ``cat`` structure."""
        leaves = self.leaves(d)
        if len(sizes) == 1:
            return [tuple(d)]
        inner = math.prod(self.size[a] for a in leaves[1:])
        if len(leaves) > 1 and all(s % inner == 0 for s in sizes):  # [heads, head_dim] split at whole heads
            heads = self.split_sum((leaves[0],), [s // inner for s in sizes])
            return [tuple(h) + tuple(leaves[1:]) for h in heads]
        if len(leaves) != 1:  # a composite dim split along its length: keep it as it is
            self.fix_dims([d], "split of a composite dim")
            return [(self.new(s, fixed=True),) for s in sizes]
        r = self.find(leaves[0])
        if r in self.sum:
            have = self.sum[r]
            if [self.dim_size(x) for x in have] == list(sizes):
                return list(have)
            # coarser pieces that sum exactly from the existing ones (split of a cat of more parts)
            out, k = [], 0
            for s in sizes:
                acc, group = 0, []
                while k < len(have) and acc < s:
                    acc += self.dim_size(have[k])
                    group.append(have[k])
                    k += 1
                if acc != s:
                    self.fix(r, "split boundaries differ from cat")
                    return [(self.new(s2, fixed=True),) for s2 in sizes]
                if len(group) == 1:
                    out.append(group[0])
                else:
                    a = self.new(s, fixed=self.fixed[r])
                    self.sum[a] = tuple(group)
                    out.append((a,))
            return out
        pieces = tuple((self.new(s, fixed=self.fixed[r]),) for s in sizes)
        self.sum[r] = pieces
        return list(pieces)

    def make_sum(self, dims: Sequence[Dim]) -> Dim:
        """A new atom that is the concatenation of ``dims``."""
        dims = [d for d in dims if self.dim_size(d) > 0]
        if len(dims) == 1:
            return tuple(dims[0])
        a = self.new(sum(self.dim_size(d) for d in dims))
        self.sum[a] = tuple(tuple(d) for d in dims)
        return (a,)


@dataclass
class ChannelGraph:
    """What the analysis found: the atoms, the dims of every tensor, and the cost terms.

    Attributes:
        trace: the traced graph (each node's dims are in ``node.meta['split_dims']``).
        atoms: the union-find.
        param_dims: parameter/buffer name -> its dims.
        mac_terms: (node, list of dims whose product is the op's MACs, constant factor).
        groups_atoms: convolution node -> its groups atom (to update ``groups``).
        unknown_ops: ops that had no rule and were fixed conservatively.
    """

    trace: Trace
    atoms: Atoms
    param_dims: Dict[str, List[Dim]]
    mac_terms: List[Tuple[fx.Node, List[Dim], float]]
    groups_atoms: Dict[str, int]
    unknown_ops: Dict[str, int]


# ----------------------------------------------------------------------------------------------- rules
def _shape(v) -> Tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class _Analysis:
    """Walks the graph in order (an interpreter on dims, not values) and applies one rule per op."""

    def __init__(self, tr: Trace, couple_inputs: bool = False, free_output: bool = False,
                 couple_products: bool = False, couple_partial: bool = False):
        self.tr = tr
        self.couple_inputs = couple_inputs
        self.free_output = free_output
        self.couple_products = couple_products
        self.couple_partial = couple_partial
        self.modules = dict(tr.model.named_modules(remove_duplicate=False))
        self.heads: List[Tuple[List[Dim], List[Dim]]] = []  # (batch dims, head_dim dims) of attention ops
        self.A = Atoms()
        self.mac_terms: List[Tuple[fx.Node, List[Dim], float]] = []
        self.groups_atoms: Dict[str, int] = {}
        self.unknown: Dict[str, int] = {}

    # dims of a node (or of a tuple output element)
    def dims(self, n) -> List[Dim]:
        return n.meta["split_dims"] if isinstance(n, fx.Node) else []

    def fresh(self, shape: Sequence[int], fixed: bool = False, why: str = "") -> List[Dim]:
        return [(self.A.new(s, fixed, why),) for s in shape]

    def run(self) -> ChannelGraph:
        A = self.A
        param_dims: Dict[str, List[Dim]] = {}
        for node in self.tr.graph.nodes:
            try:
                self.step(node, param_dims)
            except SplitError:
                raise
            except Exception as e:  # an internal error in a rule: say where
                raise SplitError(
                    f"channel analysis failed at {node.format_node()} "
                    f"(module '{_module_of(node)}'): {type(e).__name__}: {e}"
                ) from e
        # attention keeps its heads and shrinks head_dim; where head_dim cannot change (rotary tables), the
        # heads shrink instead
        self.fix_buffer_geometry(param_dims)
        mixed = self.layer_widths(param_dims)  # talking heads: a Linear over the heads makes them a width
        for batch, head_dim in self.heads:
            if any(A.any_free(d) for d in head_dim) and not any(r in mixed for d in batch for r in A.leaves(d)):
                A.fix_dims(batch, "attention heads (head_dim shrinks instead)")
        return ChannelGraph(self.tr, A, param_dims, self.mac_terms, self.groups_atoms, self.unknown)

    def read_dim(self, name: str) -> Optional[int]:
        """The dim of parameter ``name`` that its layer contracts over (reads, does not make): a Linear's
        ``in_features``, a conv's ``in_channels``; None for any other tensor."""
        path, _, leaf = name.rpartition(".")
        mod = self.modules.get(path)
        if leaf != "weight":
            return None
        if isinstance(mod, nn.Linear):
            return 1
        if isinstance(mod, nn.modules.conv._ConvNd):
            return 0 if mod.transposed else 1
        return None

    def layer_widths(self, param_dims: Dict[str, List[Dim]]) -> set:
        """The atoms that are a Linear's whole input width (what it mixes: CaiT's ``proj_l`` over the heads;
        not a width that is one factor of its input or output, as heads are of every ``qkv``)."""
        out = set()
        for name, dims in param_dims.items():
            if isinstance(self.modules.get(name.rpartition(".")[0]), nn.Linear) and self.read_dim(name) == 1:
                leaves = self.A.leaves(dims[1])
                if len(leaves) == 1:
                    out.add(self.A.find(leaves[0]))
        return out

    def fix_buffer_geometry(self, param_dims: Dict[str, List[Dim]]) -> None:
        """Fix the widths that only a buffer makes and only layers read: Swin-V2's relative-coordinate table
        ``[1, 2h-1, 2w-1, 2]`` feeds a Linear(2, 512), and its 2 is (dy, dx), not a channel count. A width
        that any parameter produces (a layer's output, a bias, a norm's scale) stays free, and so does one no
        layer reads (a rotary ``periods`` buffer, which follows head_dim)."""
        A = self.A
        made_by_buffer, made_by_param, read_by_layer = set(), set(), set()
        for name, dims in param_dims.items():
            read = self.read_dim(name)
            for i, d in enumerate(dims):
                if len(d) != 1:
                    continue
                r = A.find(d[0])
                if name in self.tr.buffers:
                    made_by_buffer.add(r)
                elif i != read:
                    made_by_param.add(r)
                else:
                    read_by_layer.add(r)
        for r in (made_by_buffer & read_by_layer) - made_by_param:
            if not A.fixed[r] and r not in A.prod and r not in A.sum:
                A.fix(r, "a buffer's geometry (only read by layers)")

    def step(self, node: fx.Node, param_dims: Dict[str, List[Dim]]) -> None:
        A = self.A
        val = node.meta.get("val")
        if node.op == "placeholder":
            if node is self.tr.input_node:
                node.meta["split_dims"] = self.fresh(_shape(val), True, "model input")
            elif node.meta.get("constant"):
                node.meta["split_dims"] = self.fresh(_shape(val), True, "tensor attribute (not a buffer)")
            else:
                node.meta["split_dims"] = self.fresh(_shape(val))
                param_dims[node.target] = node.meta["split_dims"]
            return
        if node.op == "output":
            for i, a in enumerate(node.all_input_nodes):
                dims = self.dims(a)
                A.fix_dims(dims[:-1] if self.free_output and i == 0 and len(dims) == 2 else dims, "model output")
            return
        if node.target is operator.getitem:
            src, i = node.args
            node.meta["split_dims"] = src.meta["split_dims"][i]
            return
        # default output dims: fresh atoms
        if isinstance(val, torch.Tensor):
            node.meta["split_dims"] = self.fresh(val.shape)
        elif isinstance(val, (tuple, list)):
            node.meta["split_dims"] = [self.fresh(v.shape) if isinstance(v, torch.Tensor) else [] for v in val]
        else:
            node.meta["split_dims"] = []
        rule = _RULES.get(node.target) or _RULES.get(getattr(node.target, "overloadpacket", None))
        if rule is not None and rule(self, node) is not False:
            return
        if isinstance(val, torch.Tensor) and self.broadcast(node):
            return
        name = str(node.target)
        self.unknown[name] = self.unknown.get(name, 0) + 1
        self.fix_all(node, f"no rule for {name}")

    # ---- generic helpers
    def tensor_args(self, node: fx.Node) -> List[fx.Node]:
        return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]

    def fix_all(self, node: fx.Node, why: str) -> None:
        for a in self.tensor_args(node):
            self.A.fix_dims(self.dims(a), why)
        out = node.meta["split_dims"]
        if isinstance(node.meta.get("val"), torch.Tensor):
            self.A.fix_dims(out, why)
        else:
            for d in out:
                self.A.fix_dims(d, why)

    def broadcast(self, node: fx.Node) -> bool:
        """Elementwise with broadcasting: align dims from the right and unify the non-1 ones."""
        out_shape = _shape(node.meta["val"])
        args = self.tensor_args(node)
        try:
            if tuple(torch.broadcast_shapes(*[_shape(a.meta["val"]) for a in args])) != out_shape:
                return False
        except RuntimeError:
            return False
        od = node.meta["split_dims"]
        for a in args:
            ad, sh = self.dims(a), _shape(a.meta["val"])
            off = len(out_shape) - len(sh)
            for k, s in enumerate(sh):
                if s != 1:
                    self.A.unify(ad[k], od[off + k], "broadcast")
        return True

    def same(self, a: fx.Node, out: List[Dim], skip: Sequence[int] = ()) -> None:
        for k, (x, y) in enumerate(zip(self.dims(a), out)):
            if k not in skip:
                self.A.unify(x, y)

    def reshape(self, node: fx.Node) -> None:
        src = node.args[0]
        self.A.unify(tuple(a for d in self.dims(src) for a in d),
                     tuple(a for d in node.meta["split_dims"] for a in d), f"reshape in {_module_of(node)}")
        self.couple_to_module_inputs(node)

    def couple_to_module_inputs(self, node: fx.Node) -> None:
        """Sizes a module passes to reshape/expand/factories usually come from its input's shape
        (``B, N, C = x.shape; ... .reshape(B, N, C)``), a coupling the graph cannot show. Where an output dim
        equals an input dim of the module that runs the op, unify them: unifying equal sizes is always
        consistent, so this can only remove freedom, never break a member. It is off on the first try:
        equal sizes are often a coincidence (ViT's attn_dim == embed_dim), and coupling them costs freedom.
        Positional inputs only: a keyword argument is a side table (EVA-02's ``rope=``, whose sizes equal
        head_dim by construction), and coupling to it fixed EVA-02-tiny's widths at S=4."""
        call = self.tr.calls.get(_module_of(node)) if self.couple_inputs else None
        if not call or not isinstance(node.meta.get("val"), torch.Tensor):
            return
        ins = [a for a in call[0] if isinstance(a, fx.Node) and "split_dims" in a.meta
               and isinstance(a.meta.get("val"), torch.Tensor)]
        if not ins:
            return
        for k, s in enumerate(_shape(node.meta["val"])):
            # a fixed size (1,024 tokens) must not fix a width that merely equals it (1,024 wide); a size with
            # one fixed factor (heads x dim_v, heads fixed) is tied only on a later retry (lambda layers)
            free = self.A.any_free if self.couple_partial else self.A.all_free
            if s < 2 or not free(node.meta["split_dims"][k]):
                continue
            for a in ins:
                for j, t in enumerate(_shape(a.meta["val"])):
                    d = a.meta["split_dims"][j]
                    # only widths that can change need the tie; a fixed input dim (an image side of 384) must
                    # not fix a width that merely has the same value (an embed dim of 384)
                    if t == s and self.A.any_free(d):
                        self.A.unify(node.meta["split_dims"][k], d, "size from input shape")
        # ``reshape(B, N, heads, C // heads)``: the last two sizes multiply to the input's last (channel) width;
        # both must be free to change (not a block size times a grid size). A later retry than the equal-size
        # ties: where those suffice (NesT), this one only costs freedom
        if not self.couple_products:
            return
        out = node.meta["split_dims"]
        shape = _shape(node.meta["val"])
        k = len(shape) - 1
        if k < 1 or shape[k - 1] < 2 or shape[k] < 2 or not self.A.all_free(out[k - 1] + out[k]):
            return
        for a in ins:
            in_shape = _shape(a.meta["val"])
            d = a.meta["split_dims"][-1] if in_shape else None
            if d and in_shape[-1] == shape[k - 1] * shape[k] and self.A.any_free(d):
                self.A.unify(out[k - 1] + out[k], d, "size from input shape")


def _module_of(node: fx.Node) -> str:
    st = node.meta.get("nn_module_stack") or []
    return st[-1] if st else ""


_RULES: Dict[object, Callable[[_Analysis, fx.Node], Optional[bool]]] = {}


def _rule(*targets):
    def deco(fn):
        for t in targets:
            _RULES[t] = fn
        return fn
    return deco


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_as.default,
       aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.alias.default,
       aten.flatten.using_ints, aten.clone.default, aten.contiguous.default, aten.detach.default,
       aten._to_copy.default, aten.lift_fresh.default)
def _r_reshape(an: _Analysis, node: fx.Node):
    if not isinstance(node.meta["val"], torch.Tensor):
        return False
    an.reshape(node)


@_rule(aten.permute.default)
def _r_permute(an, node):
    src, perm = node.args[0], node.args[1]
    sd, od = an.dims(src), node.meta["split_dims"]
    for i, p in enumerate(perm):
        an.A.unify(sd[_norm_dim(p, len(sd))], od[i])


@_rule(aten.transpose.int)
def _r_transpose(an, node):
    src, a, b = node.args[:3]
    sd = list(an.dims(src))
    a, b = _norm_dim(a, len(sd)), _norm_dim(b, len(sd))
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
    sh, od = _shape(src.meta["val"]), node.meta["split_dims"]
    out_shape = _shape(node.meta["val"])
    off = len(out_shape) - len(sh)
    for k in range(off):
        an.A.fix_dims([od[k]], "expand")
    for k, s in enumerate(sh):
        n = out_shape[off + k]
        back = None if s == n else _reduced_from(src, k)
        if s == n:
            an.A.unify(an.dims(src)[k], od[off + k])
        elif back is not None and _shape(back.meta["val"])[k] == n:
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
    shape = _shape(node.meta.get("val"))
    while node.op == "call_function":
        ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if node.target in _REDUCTIONS:
            src = node.args[0]
            dims = _arg(node, _REDUCTIONS[node.target], "dim")
            dims = [dims] if isinstance(dims, int) else list(dims or ())
            nd = len(_shape(src.meta["val"]))
            return src if nd == len(shape) and k in [d % nd for d in dims] else None
        if len(ins) != 1 or _shape(ins[0].meta["val"]) != shape:
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
    dim = _norm_dim(dim, len(sd))
    an.A.fix_dims([sd[dim]], "indexed with select")
    for x, y in zip(sd[:dim] + sd[dim + 1:], node.meta["split_dims"]):
        an.A.unify(x, y)


@_rule(aten.unbind.int)
def _r_unbind(an, node):
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    sd = an.dims(src)
    dim = _norm_dim(dim, len(sd))
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
    dim = _norm_dim(dim, len(sd))
    size = _shape(src.meta["val"])[dim]
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
    dim = _norm_dim(dim, len(sd))
    pieces = an.A.split_sum(sd[dim], sizes)
    outs = node.meta["split_dims"]
    for p, out in zip(pieces, outs):
        an.A.unify(p, out[dim], "split")
        for k, (x, y) in enumerate(zip(sd, out)):
            if k != dim:
                an.A.unify(x, y)


@_rule(aten.split.Tensor, aten.unsafe_split.Tensor, aten.split_with_sizes.default,
       aten.unsafe_split_with_sizes.default, aten.chunk.default)
def _r_split(an, node):
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = [_shape(v)[_norm_dim(dim, len(_shape(v)))] for v in node.meta["val"]]
    _split_outputs(an, node, sizes, dim)
    if node.target in _EQUAL_SPLITS:  # one split size for all pieces: the full pieces stay equal
        outs = node.meta["split_dims"]
        d = _norm_dim(dim, len(outs[0]))
        full = [o[d] for o, s in zip(outs, sizes) if s == sizes[0]]
        for o in full[1:]:
            an.A.unify(full[0], o, "equal split")
        if len(full) != len(sizes):  # a ragged last piece ties the total to the split size: keep fixed
            an.A.fix_dims([o[d] for o in outs], "ragged split")


_EQUAL_SPLITS = {aten.split.Tensor, aten.unsafe_split.Tensor, aten.chunk.default}


@_rule(aten.cat.default)
def _r_cat(an, node):
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    od = node.meta["split_dims"]
    dim = _norm_dim(dim, len(od))
    tensors = [t for t in tensors if len(_shape(t.meta["val"])) == len(od)]  # legacy empty tensors
    for t in tensors:
        an.same(t, od, skip=(dim,))
    an.A.unify(an.A.make_sum([an.dims(t)[dim] for t in tensors]), od[dim], "cat")


@_rule(aten.stack.default)
def _r_stack(an, node):
    tensors = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else 0
    od = node.meta["split_dims"]
    dim = _norm_dim(dim, len(od))
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
    _bias(an, node.args[0], node.meta["split_dims"], _shape(node.meta["val"]))


@_rule(aten.bmm.default)
def _r_bmm(an, node):
    _mm(an, node, node.args[0], node.args[1], node.meta["split_dims"], batch=1)


@_rule(aten.baddbmm.default)
def _r_baddbmm(an, node):
    _mm(an, node, node.args[1], node.args[2], node.meta["split_dims"], batch=1)
    _bias(an, node.args[0], node.meta["split_dims"], _shape(node.meta["val"]))


def _bias(an, bias, od, out_shape):
    if not isinstance(bias, fx.Node):
        return
    sh = _shape(bias.meta["val"])
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
        depthwise = (_shape(x.meta["val"])[1] == groups)
        g = A.new(groups, fixed=not depthwise, why="group count of a grouped conv")
        if transposed:  # weight [Cin, Cout/g, k...]
            A.unify(xd[1], w_in)
            A.unify(xd[1], (g, A.new(_shape(x.meta["val"])[1] // groups)))
            A.unify(od[1], (g,) + tuple(w_out))
        else:  # weight [Cout, Cin/g, k...]
            A.unify(xd[1], (g,) + tuple(w_in))
            out_per = A.new(_shape(node.meta["val"])[1] // groups)
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
        if isinstance(p, fx.Node) and _shape(p.meta["val"]):
            an.A.unify(an.dims(p)[0], xd[1])
    for o, v in zip(outs[1:], node.meta["val"][1:]):
        if _shape(v) and _shape(v)[0] == _shape(x.meta["val"])[1]:
            an.A.unify(o[0], xd[1])
        else:
            an.A.fix_dims(o, "norm statistics")
    affine = isinstance(node.args[1], fx.Node)
    an.mac_terms.append((node, list(xd), 2.0 if affine else 1.0))  # fvcore: batch_norm, eval


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
    an.mac_terms.append((node, list(xd), 5.0 if isinstance(node.args[2], fx.Node) else 4.0))  # fvcore


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
        an.A.unify(xd[1], (g, an.A.new(_shape(x.meta["val"])[1] // groups)))
    for o in outs[1:]:
        an.A.fix_dims(o, "norm statistics")
    an.mac_terms.append((node, list(xd), 5.0 if isinstance(w, fx.Node) else 4.0))  # fvcore


def _reduce(an, node, dims_arg, keepdim):
    x = node.args[0]
    xd = an.dims(x)
    rank = len(xd)
    if dims_arg is None or (isinstance(dims_arg, (list, tuple)) and len(dims_arg) == 0):
        red = set(range(rank))
    else:
        dl = dims_arg if isinstance(dims_arg, (list, tuple)) else [dims_arg]
        red = {_norm_dim(d, rank) for d in dl}
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


_FVCORE_ELEMENTWISE = {"upsample_nearest2d": ("out", 1.0), "upsample_bilinear2d": ("out", 4.0),
                       "_adaptive_avg_pool2d": ("in", 1.0), "grid_sampler_2d": ("out", 4.0)}


def _pool(an, node, nspatial):
    x = node.args[0]
    name = getattr(node.target, "__name__", "").split(".")[0]
    if name in _FVCORE_ELEMENTWISE:  # the elementwise ops fvcore's default table counts
        which, w = _FVCORE_ELEMENTWISE[name]
        dims = an.dims(x) if which == "in" else node.meta["split_dims"]
        an.mac_terms.append((node, list(dims), w))
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
    xs = _shape(x.meta["val"])[-len(xd):] if xd else ()
    val = node.meta["val"]
    os_ = _shape(val if isinstance(val, torch.Tensor) else val[0])[-len(od):] if od else ()
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
        _RULES[_pkt] = (lambda n: (lambda an, node: _pool(an, node, n)))(_n)


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


@_rule(aten.im2col.default)
def _r_im2col(an, node):
    x, kernel = node.args[:2]
    xd, od = an.dims(x), node.meta["split_dims"]
    an.A.unify(xd[0], od[0])
    an.A.unify(tuple(xd[1]) + (an.A.new(math.prod(kernel), True, "unfold kernel"),), od[1])
    an.A.fix_dims([od[2]] + list(xd[2:]), "spatial")


@_rule(aten.col2im.default)
def _r_col2im(an, node):
    x, _, kernel = node.args[:3]
    xd, od = an.dims(x), node.meta["split_dims"]
    an.A.unify(xd[0], od[0])
    an.A.unify(tuple(od[1]) + (an.A.new(math.prod(kernel), True, "fold kernel"),), xd[1])
    an.A.fix_dims([xd[2]] + list(od[2:]), "spatial")


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
        ish = _shape(indices[k].meta["val"])
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
    dim = _norm_dim(dim, len(xd))
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
        _RULES[getattr(aten, _name)] = _sdpa

for _name in ("empty", "zeros", "ones", "full", "arange", "eye", "rand", "randn", "scalar_tensor",
              "empty_strided", "linspace", "randint"):
    if hasattr(aten, _name):  # fresh dims, tied only to the sizes the module read from its input
        _RULES[getattr(aten, _name)] = (lambda an, node: an.couple_to_module_inputs(node))


def analyse(tr: Trace, couple_inputs: bool = False, free_output: bool = False,
            couple_products: bool = False, couple_partial: bool = False) -> ChannelGraph:
    """Run the channel analysis on a trace.

    Args:
        tr: the output of :func:`timm_split.trace.trace`.
        couple_inputs: also tie the sizes an op takes to equal dims of its module's input (see
            ``_Analysis.couple_to_module_inputs``); the retry when a member built without it does not run.
        couple_products: with ``couple_inputs``, also tie a reshape's last two sizes to the module input's
            last width where they multiply to it (``C // num_heads``); the next retry.
        couple_partial: with ``couple_inputs``, also tie sizes that have a fixed factor (``heads x dim_v``
            with the heads fixed, as a lambda layer's ``reshape(B, C, H, W)``); the last retry.
        free_output: the width of a ``[B, C]`` model output may change (a headless model, ``num_classes=0``,
            returns pooled features; the ensemble concatenates its members' features).

    Returns:
        The :class:`ChannelGraph`; ``node.meta['split_dims']`` is filled in for every node.
    """
    cg = _Analysis(tr, couple_inputs, free_output, couple_products, couple_partial).run()
    if cg.unknown_ops:
        _logger.info("ops without a channel rule (their dims were kept fixed): %s", cg.unknown_ops)
    return cg
