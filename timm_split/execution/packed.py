"""``'packed'``: the S members run as one packed network (:func:`timm_split.packing.build_program`).

Also :class:`PackedMembers` / :func:`pack_members` (the members as one module) and :class:`CudaGraphed`
(replay a packed inference call from a CUDA graph).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..packing import PackedProgram, PackingError, build_program
from ..trace import input_shape_for
from .base import Execution, Members, check_same_device, check_same_structure, needs_graph
from .loop import LoopExecution

_logger = logging.getLogger(__name__)

__all__ = ["PackedExecution", "PackedMembers", "pack_members", "CudaGraphed"]


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

    One :class:`PackedProgram` is built per (input shape, dtype, shared batch or views, train/eval flags). The
    packed tensors are packed afresh from the members when a graph is needed or a buffer is updated (each call's
    own); otherwise (inference) the last program's are kept and refreshed in place from the members on each call
    (:meth:`PackedProgram.refresh`), so every weight change is seen: an optimizer step, ``load_state_dict``, and
    ``p.data`` edits, which no version counter sees. That copy of the weights costs time on CPU at small batches
    (one intra-op thread, S=2 at 64 px, the refresh against the program's own time: resnet18 batch 1 +91%, batch 8
    +37%, resnet50 batch 1 +79%; vit_tiny at 224 px +11%; benchmarks/packed_refresh_cost.py) and little on CUDA.
    Threads may share one execution: programs and kept tensors are used under :attr:`lock`. If a program cannot be
    built (a forward that does not record, or ``strict`` and an op without a rule), a warning names the op and that
    input shape runs as the loop.

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
        self._cache: Optional[Tuple[PackedProgram, List[torch.Tensor]]] = None  # the last program's tensors
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
        with self.lock:
            return self._program(members, views, fallback)

    def _program(self, members: Members, views: List[torch.Tensor], fallback: bool) -> Optional[PackedProgram]:
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

    def _kept(self, program: PackedProgram, members: Members) -> List[torch.Tensor]:
        """The kept packed tensors of ``program``, refreshed from the members now (call under :attr:`lock`)."""
        if self._cache is None or self._cache[0] is not program or not program.refresh(members, self._cache[1]):
            self._cache = (program, program.pack(members))  # one program's tensors kept, as one copy of the weights
            self._graphs = None  # captured over the tensors replaced
        return self._cache[1]

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        program = self.program(members, views)
        if program is None:
            return LoopExecution().run(members, views)
        x = views[0] if program.shared_input else torch.stack(views)
        graph = needs_graph(members) or (torch.is_grad_enabled() and any(v.requires_grad for v in views))
        if graph or program.mutated:  # this call's own tensors (a graph may save them): nothing shared
            tensors = program.pack(members)
            out = program(x, tensors)
            program.write_back(members, tensors)
            return out
        with self.lock:  # the kept tensors (and CUDA graphs) are shared by the calls
            tensors = self._kept(program, members)
            if self.cuda_graphs and x.is_cuda:
                return self._replay(program, tensors, x)
            return program(x, tensors)

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
