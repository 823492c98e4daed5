"""Stage 2, analyse: find the channel groups, the sets of tensor dimensions that must change width together.

Every dimension of every tensor in the traced graph is a product of *atoms* (:mod:`~timm_split.engine.atoms`).
An atom is *fixed* when its width must not change: the image channels, batch, spatial and token dims, the
classes, attention heads (head_dim shrinks instead), the group count of a grouped conv, and anything an op rule
cannot prove safe. Fixing is always safe; it only costs parity, which the planner then recovers elsewhere.

The propagation is an interpreter over the graph: each op's rule (:mod:`~timm_split.engine.rules`) unifies the
atoms of its inputs and outputs, and writes the output dims into ``node.meta['split_dims']``.

Sizes a module reads from its input's shape are invisible in the graph. :data:`RETRY_LADDER` lists the
analyses tried in turn when the member planned from the previous one does not run; each ties more sizes (and
so costs more freedom) than the one before.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import SplitError
from ..trace import Trace
from .atoms import Atoms, Dim
from .rules import module_of, rule_for, shape_of
from .tables import source_dim, table_layout

_logger = logging.getLogger(__name__)

__all__ = ["AnalysisOptions", "RETRY_LADDER", "ChannelGraph", "Interpreter", "analyse"]


@dataclass(frozen=True)
class AnalysisOptions:
    """Which sizes the analysis ties beyond what the ops show (see :meth:`Interpreter.couple_to_module_inputs`).

    Attributes:
        couple_inputs: tie a size an op takes (reshape, expand, factory) to an equal free dim of its module's
            positional input, where the size is all free.
        couple_products: with ``couple_inputs``, also tie a reshape's last two sizes to the module input's last
            width where they multiply to it (``reshape(B, N, heads, C // heads)``).
        couple_partial: with ``couple_inputs``, also tie sizes that have a fixed factor (``heads x dim_v`` with
            the heads fixed, a lambda layer's ``reshape(B, C, H, W)``).
        tie_attributes: after the analysis, make the channel groups behind each width attribute the previous
            plan found ambiguous one group (:func:`~timm_split.engine.attributes.attribute_ties`).
        free_output: the width of a ``[B, C]`` model output may change (a headless model, ``num_classes=0``).
        adds: what this step of :data:`RETRY_LADDER` adds, for the log.
    """

    couple_inputs: bool = False
    couple_products: bool = False
    couple_partial: bool = False
    tie_attributes: bool = False
    free_output: bool = False
    adds: str = "nothing"


# The analyses tried in order; the next one only where the member planned from the previous does not run.
# Tying equal sizes is always consistent but coincidences (ViT's attn_dim == embed_dim) cost freedom, so each
# step ties more than the one before, and the last one goes back to fewer ties plus the partial ones.
RETRY_LADDER: Tuple[AnalysisOptions, ...] = (
    AnalysisOptions(),
    AnalysisOptions(couple_inputs=True, adds="input-shape couplings"),
    AnalysisOptions(couple_inputs=True, couple_products=True, adds="C // heads couplings"),
    AnalysisOptions(couple_inputs=True, couple_products=True, tie_attributes=True,
                    adds="the groups of ambiguous attributes tied"),
    AnalysisOptions(couple_inputs=True, couple_partial=True, adds="input-shape couplings of sizes with a fixed factor"),
)


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
        options: the options the analysis ran with.
    """

    trace: Trace
    atoms: Atoms
    param_dims: Dict[str, List[Dim]]
    mac_terms: List[Tuple[fx.Node, List[Dim], float]]
    groups_atoms: Dict[str, int]
    unknown_ops: Dict[str, int]
    options: AnalysisOptions = AnalysisOptions()


class Interpreter:
    """Walks the graph in order (an interpreter on dims, not values) and applies one rule per op
    (:mod:`~timm_split.engine.rules`)."""

    def __init__(self, tr: Trace, options: AnalysisOptions):
        self.tr = tr
        self.options = options
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
                    f"(module '{module_of(node)}'): {type(e).__name__}: {e}"
                ) from e
        self.tie_tables(param_dims)
        # attention keeps its heads and shrinks head_dim; where head_dim cannot change (rotary tables), the
        # heads shrink instead
        self.fix_buffer_geometry(param_dims)
        mixed = self.layer_widths(param_dims)  # talking heads: a Linear over the heads makes them a width
        for batch, head_dim in self.heads:
            if any(A.any_free(d) for d in head_dim) and not any(r in mixed for d in batch for r in A.leaves(d)):
                A.fix_dims(batch, "attention heads (head_dim shrinks instead)")
        return ChannelGraph(self.tr, A, param_dims, self.mac_terms, self.groups_atoms, self.unknown, self.options)

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

    def tie_tables(self, param_dims: Dict[str, List[Dim]]) -> None:
        """Give each computed table (:mod:`~timm_split.engine.tables`) its layout: the table's width becomes the
        product of fixed sizes and the atoms of the buffers it is computed from (RoPE's ``pos_embed`` width is
        ``2 x ndim x bands x 2``), so the widths a plan gives them stay consistent."""
        for path, mod in self.modules.items():
            for leaf, k, factors in getattr(table_layout(mod), "ties", ()):
                why = f"{type(mod).__name__}'s table layout"
                dims = param_dims.get(f"{path}.{leaf}" if path else leaf)
                parts = [(self.A.new(f, fixed=True, why=why),) if isinstance(f, int)
                         else source_dim(path, f, param_dims) for f in factors]
                if dims is not None and all(d is not None for d in parts):
                    self.A.unify(dims[k], tuple(a for d in parts for a in d), why=why)
                elif dims is not None:
                    self.A.fix_dims([dims[k]], "a computed table without its source")

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
                node.meta["split_dims"] = self.fresh(shape_of(val), True, "model input")
            elif node.meta.get("constant"):
                node.meta["split_dims"] = self.fresh(shape_of(val), True, "tensor attribute (not a buffer)")
            else:
                node.meta["split_dims"] = self.fresh(shape_of(val))
                param_dims[node.target] = node.meta["split_dims"]
            return
        if node.op == "output":
            for i, a in enumerate(node.all_input_nodes):
                dims = self.dims(a)
                free = self.options.free_output and i == 0 and len(dims) == 2
                A.fix_dims(dims[:-1] if free else dims, "model output")
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
        rule = rule_for(node)
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
        out_shape = shape_of(node.meta["val"])
        args = self.tensor_args(node)
        try:
            if tuple(torch.broadcast_shapes(*[shape_of(a.meta["val"]) for a in args])) != out_shape:
                return False
        except RuntimeError:
            return False
        od = node.meta["split_dims"]
        for a in args:
            ad, sh = self.dims(a), shape_of(a.meta["val"])
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
                     tuple(a for d in node.meta["split_dims"] for a in d), f"reshape in {module_of(node)}")
        self.couple_to_module_inputs(node)

    def couple_to_module_inputs(self, node: fx.Node) -> None:
        """Sizes a module passes to reshape/expand/factories usually come from its input's shape
        (``B, N, C = x.shape; ... .reshape(B, N, C)``), a coupling the graph cannot show. Where an output dim
        equals an input dim of the module that runs the op, unify them: unifying equal sizes is always
        consistent, so this can only remove freedom, never break a member. It is off on the first try:
        equal sizes are often a coincidence (ViT's attn_dim == embed_dim), and coupling them costs freedom.
        Positional inputs only: a keyword argument is a side table (EVA-02's ``rope=``, whose sizes equal
        head_dim by construction), and coupling to it fixed EVA-02-tiny's widths at S=4."""
        call = self.tr.calls.get(module_of(node)) if self.options.couple_inputs else None
        if not call or not isinstance(node.meta.get("val"), torch.Tensor):
            return
        ins = [a for a in call[0] if isinstance(a, fx.Node) and "split_dims" in a.meta
               and isinstance(a.meta.get("val"), torch.Tensor)]
        if not ins:
            return
        for k, s in enumerate(shape_of(node.meta["val"])):
            # a fixed size (1,024 tokens) must not fix a width that merely equals it (1,024 wide); a size with
            # one fixed factor (heads x dim_v, heads fixed) is tied only on a later retry (lambda layers)
            free = self.A.any_free if self.options.couple_partial else self.A.all_free
            if s < 2 or not free(node.meta["split_dims"][k]):
                continue
            for a in ins:
                for j, t in enumerate(shape_of(a.meta["val"])):
                    d = a.meta["split_dims"][j]
                    # only widths that can change need the tie; a fixed input dim (an image side of 384) must
                    # not fix a width that merely has the same value (an embed dim of 384)
                    if t == s and self.A.any_free(d):
                        self.A.unify(node.meta["split_dims"][k], d, "size from input shape")
        # ``reshape(B, N, heads, C // heads)``: the last two sizes multiply to the input's last (channel) width;
        # both must be free to change (not a block size times a grid size). A later retry than the equal-size
        # ties: where those suffice (NesT), this one only costs freedom
        if not self.options.couple_products:
            return
        out = node.meta["split_dims"]
        shape = shape_of(node.meta["val"])
        k = len(shape) - 1
        if k < 1 or shape[k - 1] < 2 or shape[k] < 2 or not self.A.all_free(out[k - 1] + out[k]):
            return
        for a in ins:
            in_shape = shape_of(a.meta["val"])
            d = a.meta["split_dims"][-1] if in_shape else None
            if d and in_shape[-1] == shape[k - 1] * shape[k] and self.A.any_free(d):
                self.A.unify(out[k - 1] + out[k], d, "size from input shape")


def analyse(tr: Trace, options: AnalysisOptions = AnalysisOptions()) -> ChannelGraph:
    """Run the channel analysis on a trace.

    Args:
        tr: the output of :func:`timm_split.trace.trace`.
        options: which sizes to tie beyond what the ops show; the default ties none (the first step of
            :data:`RETRY_LADDER`).

    Returns:
        The :class:`ChannelGraph`; ``node.meta['split_dims']`` is filled in for every node.
    """
    cg = Interpreter(tr, options).run()
    if cg.unknown_ops:
        _logger.info("ops without a channel rule (their dims were kept fixed): %s", cg.unknown_ops)
    return cg
