"""Run the S members of a split ensemble as one packed network (the ``'packed'`` execution).

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from ..execution.base import Execution, check_same_device, check_same_structure, device_of, needs_graph, version_key
from ..execution.loop import LoopExecution
from ..trace import MetaRecurrent, input_shape_for
from .record import Recording, record
from .rules import PV, Packer, PackingError

_logger = logging.getLogger(__name__)

__all__ = ["PackingError", "PackedProgram", "PackedMembers", "PackedExecution", "CudaGraphed", "pack_members",
           "build_program"]

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
    packer = Packer(S, channels_last=channels_last, strict=strict, device=device_of(members[0]))
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


class CudaGraphed:
    """``fn(*inputs)`` captured once as a CUDA graph and replayed: for static shapes in the launch-bound regime
    (batch 1 inference). Each call copies its inputs into the captured ones and clones the output out of the
    graph's memory pool. Tensors ``fn`` closes over (weights) must stay where they are.

    Args:
        fn: a function of tensors returning one tensor. It is captured under the calling thread's grad and
            autocast state, which must stay the same for the replays (capture under ``torch.no_grad()`` for
            inference).
        inputs: example inputs: their shapes, dtypes and devices are fixed from now on.
        warmup: eager calls on a side stream before capturing (cuDNN/cuBLAS settle their kernels there).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], warmup: int = 3):
        if not inputs or any(not t.is_cuda for t in inputs):
            raise ValueError("CUDA graphs need CUDA tensors; move the model and inputs to a GPU, or do not ask "
                             "for cuda_graphs")
        self.static = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.static)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for s, t in zip(self.static, inputs):
            s.copy_(t)
        self.graph.replay()
        return self.out.clone()


def _default_shape(member: nn.Module) -> Tuple[int, ...]:
    """The pretrained config's input shape, or the ``img_size`` a patch embedding was built for."""
    shape = input_shape_for(member, batch_size=2)
    for m in member.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return (2, shape[1], *size)
    return shape


class PackedExecution(Execution):
    """The members as one packed network (see the module docstring); the ``'packed'`` strategy.

    One :class:`PackedProgram` is built per (input shape, dtype, shared batch or views, train/eval flags); the
    packed tensors are rebuilt from the members when a graph is needed or a buffer is updated, and cached
    otherwise (while no member tensor changes). If a program cannot be built (a forward that does not record,
    or ``strict`` and an op without a rule), a warning names the op and that input shape runs as the loop.

    Args:
        channels_last: run 4-d convolutions channels-last (default: on CPU, where oneDNN's grouped convolutions
            are much faster in that layout; on CUDA when the input is channels-last).
        strict: an op without a packing rule raises :class:`PackingError` (from :meth:`check`) instead of
            running once per member inside the packed graph.
        cuda_graphs: on CUDA, replay inference calls (no autograd graph, no buffer updates) from a CUDA graph
            captured per input shape.
    """

    name = "packed"
    _transient = ("_programs", "_cache", "_graphs")

    def __init__(self, channels_last: Optional[bool] = None, strict: bool = False, cuda_graphs: bool = False):
        for arg, val in (("strict", strict), ("cuda_graphs", cuda_graphs)):
            if not isinstance(val, bool):
                raise ValueError(f"{arg} must be True or False, got {val!r}")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be True, False or None (automatic), got {channels_last!r}")
        self.channels_last, self.strict, self.cuda_graphs = channels_last, strict, cuda_graphs
        self._programs: Optional[Dict[Tuple, Optional[PackedProgram]]] = None
        self._cache: Optional[Tuple[Any, Tuple, List[torch.Tensor]]] = None
        self._graphs: Optional[Dict[Tuple, CudaGraphed]] = None

    def check(self, members: Members) -> None:
        """Same device and structure; with ``strict``, also that every op of the members packs (recorded at
        their default input size; where they do not run at that size the check waits for the first call)."""
        check_same_device(members, self.name)
        check_same_structure(members, self.name)
        if not self.strict:
            return
        try:
            self.program(members, [torch.empty(_default_shape(members[0]), device="meta")] * len(members),
                         fallback=False)
        except PackingError:
            raise
        except ValueError as e:
            _logger.debug("packed: not checked at the default input size (%s)", e)

    def _key(self, members: Members, views: List[torch.Tensor]) -> Tuple:
        shared = all(v is views[0] for v in views)
        cl = self._channels_last(views[0])
        flags = tuple(m.training for m in members[0].modules())
        return tuple(views[0].shape), views[0].dtype, shared, cl, flags

    def _channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        layout_cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return x.device.type == "cpu" or layout_cl

    def program(self, members: Members, views: List[torch.Tensor], fallback: bool = True) -> Optional[PackedProgram]:
        """The packed program for these views (built on first use), or None where it runs as the loop."""
        if self._programs is None:
            self._programs = {}
        key = self._key(members, views)
        if key not in self._programs:
            try:
                self._programs[key] = build_program(members, key[0], key[1], key[2], key[3], self.strict)
            except ValueError as e:
                if not fallback:
                    raise
                _logger.warning("packed: running the loop for input %s: %s", list(key[0]), e)
                self._programs[key] = None
        return self._programs[key]

    def _tensors(self, program: PackedProgram, members: Members, graph: bool) -> List[torch.Tensor]:
        if graph or program.mutated:
            return program.pack(members)
        version = version_key(members)
        if version is None or self._cache is None or self._cache[0] is not program or self._cache[1] != version:
            self._cache = (program, version, program.pack(members))
            self._graphs = None
        return self._cache[2]

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        program = self.program(members, views)
        if program is None:
            return LoopExecution().run(members, views)
        graph = needs_graph(members)
        tensors = self._tensors(program, members, graph)
        x = views[0] if program.shared_input else torch.stack(views)
        if self.cuda_graphs and x.is_cuda and not graph and not program.mutated:
            out = self._replay(program, tensors, x)
        else:
            out = program(x, tensors)
        program.write_back(members, tensors)
        return out

    def _replay(self, program: PackedProgram, tensors: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self._graphs is None:
            self._graphs = {}
        key = (id(program), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in self._graphs:
            with torch.no_grad():
                self._graphs[key] = CudaGraphed(lambda v: program(v, tensors), [x])
        return self._graphs[key](x)


class PackedMembers(nn.Module):
    """The members as one module: ``forward(x) -> [S, B, ...]`` through the packed network.

    It holds the members themselves (not copies), so its parameters are theirs and training it trains them.
    :meth:`program` gives the packed ``fx.GraphModule`` for an input, to look at (``.graph``, ``.code``).
    """

    def __init__(self, members: Members, **options: Any):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.execution = PackedExecution(**options)
        self.execution.check(self.members)

    def _views(self, x: Any) -> List[torch.Tensor]:
        S = len(self.members)
        if isinstance(x, (list, tuple)):
            return list(x)
        return list(x.unbind(0)) if x.dim() >= 5 and x.shape[0] == S else [x] * S

    def forward(self, x: Any) -> torch.Tensor:
        """Every member's output, stacked ``[S, B, ...]``; ``x`` is one batch or per-member views."""
        return self.execution.run(self.members, self._views(x))

    def program(self, x: Any) -> PackedProgram:
        """The :class:`PackedProgram` that runs ``x`` (raises :class:`PackingError` where it cannot be built)."""
        return self.execution.program(self.members, self._views(x), fallback=False)

    @property
    def looped_ops(self) -> List[str]:
        """Ops that run once per member in any program built so far."""
        return sorted({op for p in (self.execution._programs or {}).values() if p for op in p.looped_ops})


def pack_members(members: Members, **options: Any) -> PackedMembers:
    """The S members (of one split plan) as one packed module.

    Args:
        members: e.g. ``ens.members``; they are used, not copied.
        **options: :class:`PackedExecution` options (``channels_last``, ``strict``, ``cuda_graphs``).

    Returns:
        A :class:`PackedMembers`: ``pack_members(ens.members)(x)`` equals ``ens.forward_members(x)``.

    Raises:
        ValueError: the members differ in structure or device, or cannot be recorded at their default input
            size (or, with ``strict``, an op has no packing rule; the message names it).
    """
    return PackedMembers(members, **options)
