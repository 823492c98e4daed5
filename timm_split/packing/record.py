"""Record one member's forward as an aten-level ``torch.fx.Graph``, in the member's own mode.

This is :func:`timm_split.trace.trace` with three differences the packing needs: the member keeps its
train/eval flags (BatchNorm in training updates its running stats, dropout draws), the input takes the
caller's dtype and shape, and ``F.scaled_dot_product_attention`` is kept as one node instead of the math
decomposition the meta device takes (so the packed network can call the fused kernel with ``S*heads``).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..trace import MetaRecurrent, Recorder, meta_copy, module_device

_logger = logging.getLogger(__name__)

__all__ = ["Recording", "record"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Recording:
    """A member's aten graph: placeholders ``input`` and one per parameter/buffer name (``names``) or
    constant tensor (``constants``: name -> the tensor, taken from the member's own attribute)."""

    def __init__(self, graph: fx.Graph, names: Dict[str, fx.Node], constants: Dict[str, torch.Tensor],
                 buffers: frozenset):
        self.graph, self.names, self.constants, self.buffers = graph, names, constants, buffers


_RECURRENT = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


class _KeepSDPA(TorchFunctionMode):
    """Records ``F.scaled_dot_product_attention`` as one aten node, and whole-sequence recurrent ops as one
    node each (their meta runs are not recorded; the packing runs recurrent ops once per member)."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention and func not in _RECURRENT:
            return func(*args, **kwargs)
        self.rec.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.rec.paused = False
        target = SDPA if func is F.scaled_dot_product_attention else func
        self.rec.add_call(target, args, kwargs, out)
        return out


def record(member: nn.Module, input_shape: Tuple[int, ...], dtype: torch.dtype) -> Recording:
    """Trace ``member`` (untouched: a meta copy runs) at ``input_shape`` in its current train/eval mode.

    Args:
        member: one member of the ensemble, on any device.
        input_shape: one member's input shape, ``(B, C, H, W)``.
        dtype: the input's dtype.

    Returns:
        The :class:`Recording`; the graph's output is the member's output node(s).

    Raises:
        ValueError: the forward fails on the meta device (names the module).
    """
    model = meta_copy(member)
    for a, b in zip(model.modules(), member.modules()):
        a.training = b.training
    graph = fx.Graph()
    env: Dict[int, fx.Node] = {}
    keep: List[torch.Tensor] = []
    names: Dict[str, fx.Node] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        node = graph.placeholder(name.replace(".", "_"))
        node.meta.update(val=t, nn_module_stack=[], tensor_name=name)
        env[id(t)] = names[name] = node
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    inp = graph.placeholder("input")
    inp.meta.update(val=x, nn_module_stack=[], is_input=True)
    env[id(x)] = inp
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack: List[str] = []

    me = threading.get_ident()  # module hooks are process-wide: other threads' forwards are not recorded

    def pre(mod: nn.Module, args: Any) -> None:
        if threading.get_ident() == me:
            stack.append(paths.get(id(mod), "?"))

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        if stack and threading.get_ident() == me:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    rec = Recorder(graph, env, keep, stack)
    try:
        with torch.no_grad(), MetaRecurrent(), rec, _KeepSDPA(rec):
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure of the member's forward on meta is reported
        where = f" in module '{stack[-1]}'" if stack else ""
        raise ValueError(f"packing: the member's forward failed on the meta device{where}: {type(e).__name__}: "
                         f"{e}; use the 'loop' execution for this model") from e
    finally:
        h1.remove()
        h2.remove()
    flat, _ = tree_flatten(out)
    outs = [env[id(o)] for o in flat if isinstance(o, torch.Tensor) and id(o) in env]
    if len(outs) != 1:
        raise ValueError(f"packing needs a member that returns one tensor, got {type(out).__name__} with "
                         f"{len(outs)} tensors; use the 'loop' execution for this model")
    graph.output(outs[0])
    constants = _constants(graph, member)
    buffers = frozenset(n for n, _ in model.named_buffers())
    return Recording(graph, names, constants, buffers)


def _constants(graph: fx.Graph, member: nn.Module) -> Dict[str, torch.Tensor]:
    """The constant placeholders (plain tensor attributes read by the forward), with the member's values."""
    out = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.meta.get("constant"):
            t: Optional[torch.Tensor] = node.meta["val"]
            if t.is_meta:
                raise ValueError(f"packing: the forward reads a tensor '{node.name}' created on the meta device "
                                 "that is neither a parameter nor a buffer; use the 'loop' execution")
            out[node.name] = t.to(module_device(member))
    return out
