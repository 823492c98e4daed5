"""Stage 1, trace: record a model's forward as an aten-level ``torch.fx.Graph`` with exact shapes.

The model is never touched: :func:`meta_copy` deep-copies it with every parameter and buffer replaced by a
``meta`` tensor (no memory, no compute), and :func:`trace` runs that copy under a ``TorchDispatchMode``. What
the mode sees is the forward after autograd and composite decomposition (``linear`` -> ``t`` + ``addmm``,
attention -> ``bmm`` + ``softmax``), so every view keeps its exact sizes and the analysis can compute channel
couplings instead of guessing them. It is ``make_fx`` minus the proxy machinery (about 10x faster), plus the
module path of every op in ``node.meta['nn_module_stack']``, which ``make_fx`` leaves empty here.
"""
from __future__ import annotations

import copy
import logging
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import SplitError

_logger = logging.getLogger(__name__)

__all__ = ["Trace", "Recorder", "meta_copy", "norm_dim", "drop_user_hooks", "trace", "input_shape_for", "size_built_at",
           "first_convs", "in_chans_built_at", "MetaRecurrent", "recurrent_meta_output", "module_device"]


def norm_dim(d: int, rank: int) -> int:
    """A dim index made non-negative (``-1`` of a rank-4 tensor is 3)."""
    return d + rank if d < 0 else d


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@dataclass
class Trace:
    """An aten-level graph of one forward pass.

    Attributes:
        graph: the graph. Placeholders are the input (``'input'``) and every parameter and buffer (named by
            its qualified name); ``node.meta['val']`` holds the meta output, ``node.meta['nn_module_stack']`` the
            module paths that were active (outermost first).
        model: the meta copy that was traced.
        params: qualified parameter/buffer name -> placeholder node.
        aliases: names that share a tensor with an earlier name (tied weights) -> that name.
        input_node: the image input placeholder.
        calls: module path -> (args, outputs, kwargs) of its first call: graph nodes for tensors, values
            otherwise (keyword arguments: a dict; DINOv3's attention takes its rope table as ``rope=``).
        buffers: names in ``params`` that are buffers, not parameters.
    """

    graph: fx.Graph
    model: nn.Module
    params: Dict[str, fx.Node]
    aliases: Dict[str, str] = field(default_factory=dict)
    input_node: Optional[fx.Node] = None
    calls: Dict[str, Tuple[list, list, dict]] = field(default_factory=dict)
    buffers: frozenset = frozenset()


def meta_copy(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` with every parameter and buffer on the meta device (no data is copied), without the
    forward and backward hooks and pre-hooks its user registered.

    The copy is what gets traced and what every member is built from, so a user's hook would run on meta
    tensors (a hook that calls ``float()`` or logs a value cannot) and would be carried into members whose
    widths it was not written for. Hooks registered by torch or timm themselves are part of the architecture
    (``torch.nn.utils.weight_norm`` recomputes the weight in a pre-hook) and are kept. Register hooks on the
    ensemble's members to have them there.

    Args:
        model: any module, on any device. It is not modified.

    Returns:
        A structurally identical module whose tensors live on ``meta``.
    """
    memo: Dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    copied = copy.deepcopy(model, memo)
    for mod in copied.modules():
        drop_user_hooks(mod)
    return copied


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _is_library_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    module = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    return module.split(".")[0] in ("torch", "timm")


def drop_user_hooks(mod: nn.Module) -> None:
    """Remove ``mod``'s own forward and backward hooks and pre-hooks (not its children's), except torch's and
    timm's (``register_full_backward_hook``, ``register_backward_hook`` and ``register_full_backward_pre_hook``
    would otherwise fire once per member on one backward).

    Args:
        mod: a module, changed in place (a copy: the user's model is never passed here).
    """
    for table in _HOOK_TABLES:
        hooks = getattr(mod, table, None)
        for key in [k for k, h in (hooks or {}).items() if not _is_library_hook(h)]:
            del hooks[key]
            for flags in _HOOK_FLAGS:
                getattr(mod, flags, {}).pop(key, None)
    if not getattr(mod, "_backward_hooks", None):
        mod._is_full_backward_hook = None  # no backward hook left of either kind


def size_built_at(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The image size a model was created at, where it keeps one: timm's ``img_size=`` of ViT-like models is in
    ``patch_embed.img_size``; some models keep ``img_size`` themselves; CoaT and Twins keep it in the module that
    owns their cfg's ``first_conv`` (``patch_embed1.proj``, ``patch_embeds.0.proj``). Not any deeper patch
    embedding: Visformer's ``patch_embed1`` follows a stem (its first conv is ``stem.0``), its ``img_size`` is a
    feature map's. None where the model keeps no size.

    Args:
        model: any module.

    Returns:
        ``(H, W)`` or None.
    """
    names = _first_conv_names(model)
    stem = None
    if names and "." in names[0] and _submodule(model, names[0]) is not None:
        stem = _submodule(model, names[0].rpartition(".")[0])
    for owner in (getattr(model, "patch_embed", None), model, stem):
        size = getattr(owner, "img_size", None) if owner is not None else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(type(v) is int and v > 0 for v in size):
            return tuple(size)
    return None


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _first_conv_names(model: nn.Module) -> Tuple[str, ...]:
    """The names a timm model's cfg gives as ``first_conv`` (one, or several)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("first_conv") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def first_convs(model: nn.Module) -> List[nn.Module]:
    """The modules a timm model's cfg names as ``first_conv`` (those it has)."""
    mods = dict(model.named_modules())
    return [mods[n] for n in _first_conv_names(model) if n in mods]


def in_chans_built_at(model: nn.Module) -> Optional[int]:
    """The input channels a timm model was created with: its ``in_chans`` attribute (every timm model sets it),
    else its cfg's ``first_conv``'s input channels, else None. The attribute comes first because the first conv
    need not see the input (TResNet's space-to-depth stem gives it 16x the channels)."""
    if isinstance(getattr(model, "in_chans", None), int):
        return model.in_chans
    convs = [m for m in first_convs(model) if isinstance(getattr(m, "in_channels", None), int)]
    return convs[0].in_channels if convs else None


def input_shape_for(model: nn.Module, img_size: Optional[Tuple[int, int]] = None, batch_size: int = 2,
                    in_chans: Optional[int] = None) -> Tuple:
    """The input shape to trace ``model`` with: ``img_size`` if given, else the size the model was created at
    (``timm.create_model('vit_small_patch16_224', img_size=64)`` keeps 64 in ``patch_embed.img_size`` while
    its ``pretrained_cfg`` still says 224), else ``pretrained_cfg['input_size']`` (or ``default_cfg``), else
    224; the channels from ``in_chans``, else the first conv's (``timm.create_model(..., in_chans=1)``), else the
    cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    c = in_chans or in_chans_built_at(model) or c
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    else:
        h, w = size_built_at(model) or (h, w)
    return (batch_size, c, h, w)


_GATES = {torch.lstm: 4, torch.gru: 3, torch.rnn_tanh: 1, torch.rnn_relu: 1}


def recurrent_meta_output(func: Any, args: tuple) -> Optional[tuple]:
    """The outputs of a whole-sequence recurrent op (``torch.lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``) on
    meta tensors, made from shapes alone, or None where this does not apply (a packed sequence, real tensors,
    weights whose shapes do not chain: then the op itself must run and raise).

    On meta, aten decomposes these ops into one cell per time step, which costs seconds per call for nothing:
    the shapes follow from the input, the states and the weights, and every weight shape is checked here.
    """
    gates = _GATES.get(func)
    if gates is None or len(args) < 9 or not isinstance(args[0], torch.Tensor) or not args[0].is_meta:
        return None
    x, hx, weights, has_biases, layers, _, _, bidirectional, batch_first = args[:9]
    states = list(hx) if func is torch.lstm else [hx]
    if x.dim() != 3 or not isinstance(weights, (list, tuple)) or not all(isinstance(h, torch.Tensor) for h in states):
        return None
    dirs = 2 if bidirectional else 1
    h_out, h_cell = states[0].shape[-1], states[-1].shape[-1]
    per = len(weights) // max(1, layers * dirs)
    feat = x.shape[-1]
    for i in range(layers * dirs):
        w_ih, w_hh = weights[i * per], weights[i * per + 1]
        want_in = feat if i < dirs else dirs * h_out
        if tuple(w_ih.shape) != (gates * h_cell, want_in) or tuple(w_hh.shape) != (gates * h_cell, h_out):
            return None
    batch = x.shape[0] if batch_first else x.shape[1]
    if any(tuple(h.shape[:2]) != (layers * dirs, batch) for h in states):
        return None
    out = x.new_empty(tuple(x.shape[:2]) + (dirs * h_out,))
    return (out,) + tuple(torch.empty_like(h) for h in states)


class MetaRecurrent(TorchFunctionMode):
    """Runs whole-sequence recurrent ops on meta tensors from their shapes (:func:`recurrent_meta_output`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = recurrent_meta_output(func, args) if not kwargs else None
        return out if out is not None else func(*args, **(kwargs or {}))


class Recorder(TorchDispatchMode):
    """Records every aten op run under it as a node of ``graph`` (``val`` and ``nn_module_stack`` in its meta).

    ``env`` maps a tensor's ``id`` to its node; a tensor made outside the graph (a plain tensor attribute) becomes
    a constant placeholder. While ``paused``, ops run unrecorded: an outer mode that records an op as one node
    (packing keeps SDPA whole) pauses the recorder and calls :meth:`add_call` itself.
    """

    paused = False

    def __init__(self, graph: fx.Graph, env: Dict[int, fx.Node], keep: List[torch.Tensor], stack: List[str]):
        super().__init__()
        self.graph, self.env, self.keep, self.stack = graph, env, keep, stack
        self.n_const = 0

    def node_for(self, t: torch.Tensor) -> fx.Node:
        """The node of tensor ``t`` (a new constant placeholder for a tensor made outside the graph)."""
        node = self.env.get(id(t))
        if node is None:
            node = self.graph.placeholder(f"_const{self.n_const}")
            self.n_const += 1
            node.meta.update(val=t, constant=True, nn_module_stack=list(self.stack))
            self.env[id(t)] = node
            self.keep.append(t)
        return node

    def add_call(self, target: Any, args: Any, kwargs: Dict[str, Any], out: Any) -> fx.Node:
        """Add ``target(*args, **kwargs) -> out`` to the graph (and a getitem node per tensor of a tuple out)."""
        to_node = lambda a: self.node_for(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        node = self.graph.call_function(target, tree_map(to_node, args), tree_map(to_node, kwargs))
        node.meta.update(val=out, nn_module_stack=list(self.stack))
        if isinstance(out, torch.Tensor):
            self.env[id(out)] = node
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    g = self.graph.call_function(operator.getitem, (node, i))
                    g.meta.update(val=o, nn_module_stack=list(self.stack))
                    self.env[id(o)] = g
                    self.keep.append(o)
        return node

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.add_call(func, args, kwargs, out)
        return out


def trace(model: nn.Module, input_shape: Tuple[int, ...]) -> Trace:
    """Record the forward pass of a meta model at ``input_shape``.

    Args:
        model: a model whose tensors are on the meta device (see :func:`meta_copy`). It is put in eval mode.
        input_shape: ``(B, C, H, W)`` (or whatever the model takes).

    Returns:
        The :class:`Trace`.

    Raises:
        SplitError: the forward failed on the meta device (data-dependent control flow, ``.item()``...).
    """
    graph = fx.Graph()
    env: Dict[int, fx.Node] = {}
    keep: List[torch.Tensor] = []
    params: Dict[str, fx.Node] = {}
    aliases: Dict[str, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        if id(t) in env:
            aliases[name] = env[id(t)].target
            continue
        node = graph.placeholder(name)
        node.meta.update(val=t, nn_module_stack=[])
        env[id(t)] = params[name] = node
    x = torch.empty(input_shape, device="meta")
    inp = graph.placeholder("input")
    inp.meta.update(val=x, nn_module_stack=[])
    env[id(x)] = inp

    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack: List[str] = []
    calls: Dict[str, Tuple[list, list, dict]] = {}
    pending: List[list] = []

    me = threading.get_ident()  # module hooks are process-wide: another thread's forward is not this trace's

    def pre(mod, args):
        if threading.get_ident() != me:
            return
        stack.append(names.get(id(mod), "?"))
        pending.append([env.get(id(a), None) if isinstance(a, torch.Tensor) else a for a in args])

    def post(mod, args, kwargs, out):  # global pre-hooks get no kwargs: those are read here
        if stack and threading.get_ident() == me:
            path = stack.pop()
            in_args = pending.pop()
            if path not in calls:
                flat_out, _ = tree_flatten(out)
                in_kwargs = {k: env.get(id(v)) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                calls[path] = (in_args, [env.get(id(o)) for o in flat_out if isinstance(o, torch.Tensor)], in_kwargs)

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post, with_kwargs=True)
    model.eval()
    try:
        with torch.no_grad(), Recorder(graph, env, keep, stack):
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward becomes a SplitError
        where = f" in module '{stack[-1]}'" if stack else ""
        raise SplitError(
            f"the forward pass failed on the meta device{where}: {type(e).__name__}: {e}. "
            "timm_split traces the model on 'meta' tensors; data-dependent Python control flow or .item() "
            "cannot be traced. Check that `model(torch.empty(shape, device='meta'))` works."
        ) from e
    finally:
        h1.remove()
        h2.remove()
        # torch's handle does not remove its with_kwargs flag; a left-over entry makes torch.compile warn
        # about global hooks for the rest of the process
        nn.modules.module._global_forward_hooks_with_kwargs.pop(h2.id, None)
    if not isinstance(out, torch.Tensor):
        what = (f"a dict with keys {sorted(map(str, out))[:4]}" if isinstance(out, dict) else
                f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else
                f"a {type(out).__name__}")
        raise SplitError(f"the model's forward returns {what}, not one tensor: the members' outputs are averaged "
                         "(or concatenated, headless), which needs one tensor per member. Split a module whose "
                         "forward returns the logits or features alone (e.g. a wrapper whose forward returns "
                         "model(x)[0] or model(x)['logits']), or the backbone (num_classes=0)")
    flat, _ = tree_flatten(out)
    outs = [env[id(o)] for o in flat if isinstance(o, torch.Tensor) and id(o) in env]
    graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    buffers = frozenset(n for n, _ in model.named_buffers(remove_duplicate=False))
    return Trace(graph=graph, model=model, params=params, aliases=aliases, input_node=inp, calls=calls,
                 buffers=buffers)
