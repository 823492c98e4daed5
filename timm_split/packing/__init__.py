"""Rewrite the S members of a split ensemble as one packed network: a pure graph pass over a member's trace.

:mod:`timm_split.execution.packed` runs the result (the ``'packed'`` execution).

The members share one plan, so every op of a member has the same shapes in all S. The packing records one
member's forward as an aten graph (:mod:`.record`, exact shapes, in the member's train/eval mode) and rewrites
it op by op into one graph over all S members (:mod:`.rules`): convolutions with ``groups * S``, linear layers
as one ``baddbmm``, attention with the members' heads side by side in one scaled-dot-product call, norms over
``S*C`` channels or per member, pointwise ops on the folded tensors. The result is a plain ``fx.GraphModule``
of aten calls (printable, ``torch.compile``-able, CUDA-graph capturable), built once per input shape and mode.

Its inputs are the members' own tensors packed by ``torch.cat``/``torch.stack`` (so gradients reach every
member's parameters); buffers that the graph updates in place (BatchNorm running stats in training) are
written back to the members afterwards. Ops without a rule run once per member inside the graph and are listed
(``looped_ops``); ``strict=True`` raises :class:`PackingError` naming the op and module instead.

Why the aten graph: it is what timm_split's planner already traces (every timm architecture traces), it has
exact shapes for every op, and after autograd's decomposition the op set is small and closed (a Linear is
``t`` + ``addmm``, LayerNorm2d is ``permute`` + ``native_layer_norm``), so a few dozen rules cover every
family instead of one rule per module class. ``torch.fx.symbolic_trace`` fails on many timm models
(data-dependent shapes), and ``make_fx`` records the same ops ~10x slower and without module paths.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from ..trace import MetaRecurrent, module_device
from .record import Recording, record
from .rules import PV, Packer, PackingError

_logger = logging.getLogger(__name__)

__all__ = ["PackingError", "PackedProgram", "build_program"]

Members = Sequence[nn.Module]


class PackedProgram:
    """The packed network for one input shape and mode.

    Attributes:
        module: the ``fx.GraphModule``; ``module(x, *tensors)`` returns ``[S, B, ...]``.
        tensors: the graph's tensor inputs after ``x``, as ``(name, how)`` with ``how`` one of ``'packed'``
            (the members' tensors concatenated on dim 0, or stacked when 0-d), ``'shared'`` (member 0's, equal
            in all members) and ``'constant'``.
        mutated: packed buffers the graph updates in place (written back to the members after a call).
        looped_ops: the ops that run once per member inside the graph, with their module paths.
        shared_input: whether ``x`` is one batch for all members (else ``[S, B, ...]``).
    """

    def __init__(self, module: fx.GraphModule, tensors: List[Tuple[str, str]], mutated: List[str],
                 looped_ops: List[str], constants: Dict[str, torch.Tensor], channels_last: frozenset,
                 shared_input: bool):
        self.module, self.tensors, self.mutated, self.looped_ops = module, tensors, mutated, looped_ops
        self.constants, self.channels_last, self.shared_input = constants, channels_last, shared_input

    def pack(self, members: Members) -> List[torch.Tensor]:
        """The graph's tensor inputs from the members' own tensors (differentiable)."""
        per = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
        out = []
        for name, how in self.tensors:
            if how == "constant":
                out.append(self.constants[name])
            elif how == "shared":
                out.append(per[0][name])
            else:
                ts = [p[name] for p in per]
                t = torch.stack(ts) if ts[0].dim() == 0 else torch.cat(ts)
                out.append(t.contiguous(memory_format=torch.channels_last) if name in self.channels_last else t)
        return out

    def refresh(self, members: Members, tensors: List[torch.Tensor]) -> bool:
        """Copy the members' current values into ``tensors`` (an earlier :meth:`pack`'s, not part of a graph) in
        place, so no weight change goes unseen, ``.data`` edits included (which no version counter sees).
        ``'shared'`` entries are member 0's own tensors, current as long as they are the same tensors.

        Returns:
            False where ``tensors`` no longer fit the members (a shared tensor replaced, a tensor replaced by one of
            another shape, dtype or device, or inference tensors outside inference mode): :meth:`pack` again then.
        """
        per = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
        try:
            with torch.no_grad():
                for j, ((name, how), t) in enumerate(zip(self.tensors, tensors)):
                    if how == "shared":
                        if per[0][name] is not t:  # replaced (a CUDA graph would read the old memory)
                            return False
                    elif how == "packed":
                        ts = [p[name] for p in per]
                        n = ts[0].shape[0] if ts[0].dim() else 1
                        if any(s.shape != ts[0].shape or s.dtype != t.dtype or s.device != t.device for s in ts) \
                                or t.shape[0] != n * len(ts) or tuple(t.shape[1:]) != tuple(ts[0].shape[1:]):
                            return False
                        for i, s in enumerate(ts):
                            t[i].copy_(s) if s.dim() == 0 else t.narrow(0, i * n, n).copy_(s)
        except RuntimeError:  # an inference tensor outside inference mode, and the like
            return False
        return True

    def write_back(self, members: Members, tensors: List[torch.Tensor]) -> None:
        """Copy the updated packed buffers back into each member's own buffers."""
        if not self.mutated:
            return
        packed = {name: t for (name, _), t in zip(self.tensors, tensors)}
        with torch.no_grad():
            for i, m in enumerate(members):
                own = dict(m.named_buffers())
                for name in self.mutated:
                    t = packed[name]
                    own[name].copy_(t[i] if t.dim() == 1 and own[name].dim() == 0 else t.chunk(len(members))[i])

    def __call__(self, x: torch.Tensor, tensors: List[torch.Tensor]) -> torch.Tensor:
        return self.module(x, *tensors)


def _mutated(rec: Recording) -> set:
    """Parameter/buffer names whose tensor some op of the member graph writes to."""
    out = set()
    for node in rec.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        writes = [a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments]
        if node.target in (torch.ops.aten.native_batch_norm.default,) and node.args[5]:
            writes[3] = writes[4] = True
        for arg, w in zip(node.args, writes):
            if w and isinstance(arg, fx.Node) and "tensor_name" in arg.meta:
                out.add(arg.meta["tensor_name"])
    return out


def _shared_buffers(rec: Recording, members: Members, mutated: set) -> set:
    """Non-float buffers equal in every member and never written (index tables, masks): passed once."""
    out = set()
    per = [dict(m.named_buffers()) for m in members]
    for name in rec.buffers & set(rec.names):
        t = per[0][name]
        if name not in mutated and not t.is_floating_point() and all(torch.equal(t, p[name]) for p in per[1:]):
            out.add(name)
    return out


def _conv_weights(rec: Recording) -> set:
    conv = torch.ops.aten.convolution.default
    return {n.args[1].meta["tensor_name"] for n in rec.graph.nodes if n.op == "call_function" and n.target is conv
            and "tensor_name" in n.args[1].meta and n.args[1].meta["val"].dim() == 4}


def build_program(members: Members, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                  shared_input: bool = True, channels_last: bool = False, strict: bool = False) -> PackedProgram:
    """Record member 0 at ``input_shape`` in its current mode and pack it for all members.

    Args:
        members: S members of one architecture (one plan), on one device.
        input_shape: one member's input shape, ``(B, C, H, W)``.
        dtype: the input dtype.
        shared_input: the members see one batch (``x`` is ``[B, ...]``), else per-member views ``[S, B, ...]``.
        channels_last: run 4-d convolutions channels-last.
        strict: raise :class:`PackingError` for an op without a rule instead of running it per member.

    Returns:
        The :class:`PackedProgram`.

    Raises:
        ValueError: the member cannot be recorded, or (``strict``) an op cannot be packed; the message names
            the op and module.
    """
    S = len(members)
    rec = record(members[0], tuple(input_shape), dtype)
    mutated = _mutated(rec)
    shared = _shared_buffers(rec, members, mutated)
    cl = _conv_weights(rec) if channels_last else set()
    packer = Packer(S, channels_last=channels_last, strict=strict, device=module_device(members[0]))
    tensors: List[Tuple[str, str]] = []
    x = packer.graph.placeholder("x")
    x.meta["val"] = torch.empty(([] if shared_input else [S]) + list(input_shape), dtype=dtype, device="meta")
    with MetaRecurrent():  # recurrent ops computed on meta from their shapes while packing
        _pack_nodes(packer, rec, x, shared, cl, tensors, shared_input)
    module = fx.GraphModule(nn.Module(), packer.graph)
    if packer.looped:
        _logger.info("packing: %d op(s) run once per member: %s", len(packer.looped), sorted(set(packer.looped)))
    return PackedProgram(module, tensors, sorted(mutated & {n for n, _ in tensors}), packer.looped, rec.constants,
                         frozenset(cl), shared_input)


def _pack_nodes(packer: Packer, rec: Recording, x: fx.Node, shared: set, cl: set, tensors: List[Tuple[str, str]],
                shared_input: bool) -> None:
    """Pack every node of the member graph, in order."""
    env: Dict[fx.Node, Any] = {}
    for node in rec.graph.nodes:
        if node.op == "placeholder":
            env[node] = _input(packer, node, x, rec, shared, cl, tensors, shared_input)
        elif node.op == "call_function" and node.target is not _getitem:
            args, kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
            stack = node.meta.get("nn_module_stack") or [""]
            env[node] = packer.op(node.target, args, kwargs, node.meta["val"], stack[-1])
        elif node.op == "call_function":
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "output":
            packer.graph.output(packer.stacked(env[node.args[0]]))


_getitem = __import__("operator").getitem


def _input(packer: Packer, node: fx.Node, x: fx.Node, rec: Recording, shared: set, cl: set,
           tensors: List[Tuple[str, str]], shared_input: bool) -> Optional[PV]:
    """The packed value of one member-graph placeholder (adding a graph input for it when it is used)."""
    val = node.meta["val"]
    if node.meta.get("is_input"):
        return PV(x, None, val.shape) if shared_input else packer.from_stacked(x)
    if not node.users:
        return None
    name = node.meta.get("tensor_name", node.name)
    how = "constant" if node.meta.get("constant") else "shared" if name in shared else "packed"
    ph = packer.graph.placeholder(f"t{len(tensors)}_{name.replace('.', '_')}")
    tensors.append((name, how))
    if how != "packed":
        ph.meta["val"] = torch.empty_like(val, device="meta")
        return PV(ph, None, val.shape)
    shape = [packer.S * val.shape[0], *val.shape[1:]] if val.dim() else [packer.S]
    fmt = torch.channels_last if name in cl else torch.contiguous_format
    ph.meta["val"] = torch.empty(shape, dtype=val.dtype, device="meta", memory_format=fmt)
    return PV(ph, 0, val.shape)
