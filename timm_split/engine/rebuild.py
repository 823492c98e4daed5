"""Stage 4, rebuild: make S members from a plan, on a copy of the model, each with its own init.

Shapes and module attributes come from the plan. A member is checked by running it on the meta device
before any memory is allocated.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..errors import SplitError
from ..trace import MetaRecurrent
from .analyse import ChannelGraph
from .atoms import NewWidths
from .plan import SplitPlan

_logger = logging.getLogger(__name__)

__all__ = ["build_member", "init_member", "inherit_member", "channel_selection", "reference_stats", "check_member"]


def build_member(template: nn.Module, plan: SplitPlan, device: torch.device, dtype_of: Dict[str, torch.dtype],
                 aliases: Dict[str, str]) -> nn.Module:
    """Copy ``template`` (a meta model) and give it the plan's shapes and attributes, with empty tensors.

    Args:
        template: the meta copy of the original model.
        plan: the plan.
        device: where the member's tensors go (``meta`` for a meta ensemble).
        dtype_of: parameter/buffer name -> dtype in the original model.
        aliases: tied names -> the name that owns the tensor.

    Returns:
        The member, uninitialised (call :func:`init_member`).
    """
    member = copy.deepcopy(template)
    mods = dict(member.named_modules(remove_duplicate=False))
    made: Dict[str, torch.Tensor] = {}
    for name, shape in plan.param_shapes.items():
        mod_path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        mod = mods[mod_path]
        old = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
        t = torch.empty(shape, device=device, dtype=dtype_of.get(name, old.dtype))
        if leaf in mod._parameters:
            t = nn.Parameter(t, requires_grad=old.requires_grad)
        _set_tensor(mod, leaf, t)
        made[name] = t
    for name, owner in aliases.items():
        mod_path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        _set_tensor(mods[mod_path], leaf, made[owner])
    for path, attr, _, new in plan.attributes + plan.regularization:
        setattr(mods[path], attr, new)
    return member


def _set_tensor(mod: nn.Module, leaf: str, t: torch.Tensor) -> None:
    """Replace a parameter or buffer through the module's ``__setattr__``: modules that cache their tensors
    (``nn.LSTM``'s ``_flat_weights``, which TorchScript reads) see the new one."""
    if leaf in mod._parameters:
        setattr(mod, leaf, t)
    else:
        mod._buffers[leaf] = t  # a buffer registered as non-persistent stays so


@torch.no_grad()
def reference_stats(original: nn.Module) -> Dict[str, tuple]:
    """Per tensor of the original: ('const', value, 0), ('normal', mean, std * sqrt(fan)) for parameters, or
    ('copy', tensor, 0) for buffers (kept, cut or tiled where they change size; BatchNorm running statistics
    are reset afterwards); a meta original gives none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny reductions: a thread pool only adds waiting
    try:
        return _reference_stats(original)
    finally:
        torch.set_num_threads(threads)


def _reference_stats(original: nn.Module) -> Dict[str, tuple]:
    out: Dict[str, tuple] = {}
    buffers = {n for n, _ in original.named_buffers()}
    for name, o in list(original.named_parameters()) + list(original.named_buffers()):
        if o.is_meta:
            continue
        if name in buffers or not o.is_floating_point():
            out[name] = ("copy", o.detach(), 0.0)  # buffers are state, not weights: kept (running stats reset)
            continue
        if o.numel() == 0:
            continue
        flat = o.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].float()  # an init's std needs no full pass
        lo, hi = torch.aminmax(sample)
        if lo.item() == hi.item() and bool((flat == flat[0]).all()):
            out[name] = ("const", lo.item(), 0.0)
            continue
        std, mean = torch.std_mean(sample) if sample.numel() > 1 else (torch.zeros(()), sample.mean())
        fan = o.numel() / max(o.shape[0], 1) if o.dim() > 1 else 1
        out[name] = ("normal", mean.item(), std.item() * math.sqrt(fan))
    return out


@torch.no_grad()
def init_member(member: nn.Module, stats: Dict[str, tuple], seed: int) -> None:
    """Initialise a member from scratch, with the model family's own init at the new widths.

    1. The model's own init runs where timm has one (``init_weights()``, or ``_init_weights`` applied to
       every module).
    2. Every tensor it did not set (seen from the tensor's version counter) gets the original's
       distribution (``stats`` from :func:`reference_stats`), rescaled for fan: constant tensors (zero-init
       last BN gammas, layer-scale, zero biases, tokens) keep their constant; others are drawn from a normal
       with the original's mean and its std times sqrt(old fan / new fan). For a freshly built timm model
       this reproduces the family's init (fan-based kaiming for convs, trunc-normal std for ViTs...).
    3. Buffers are copied (cut or tiled to the new shape) and BatchNorm running statistics reset.

    Args:
        member: the member to initialise in place (freshly built by :func:`build_member`).
        stats: the original's per-tensor statistics.
        seed: the member's seed; the global RNG state is left untouched.
    """
    devices = sorted({p.device.index or 0 for p in member.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        tensors = dict(member.named_parameters())
        tensors.update(dict(member.named_buffers()))
        versions = {name: t._version for name, t in tensors.items()}
        ran = _run_own_init(member)  # the family's init first; it sets what it knows about
        for name, t in tensors.items():
            kind, a, b = stats.get(name, ("const", 0.0, 0.0))
            if kind == "copy":
                t.copy_(_resize_like(a, t.shape))
            elif t._version != versions[name] or not t.is_floating_point():
                continue  # set by the model's own init
            elif kind == "const":
                t.fill_(a)
            else:
                fan = t.numel() / max(t.shape[0], 1) if t.dim() > 1 else 1
                t.normal_(a, b / math.sqrt(max(fan, 1)))
        for mod in member.modules():  # running statistics start fresh, as in a newly built model
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                mod.reset_running_stats()
        if ran:
            _logger.debug("ran the model's own init: %s", ran)


def _resize_like(src: torch.Tensor, shape) -> torch.Tensor:
    """``src`` cut (first entries) or tiled to ``shape`` dim by dim. Exact where the resized dims are uniform
    (BlurPool filters, zero biases); a rotary ``periods`` buffer the forward builds its table from keeps its first
    frequency bands, still a valid encoding for a member trained from scratch. Cached tables are not cut: they
    are recomputed (:mod:`~timm_split.engine.tables`)."""
    for k, n in enumerate(shape):
        if src.shape[k] != n:
            idx = torch.arange(n, device=src.device).clamp_(max=src.shape[k] - 1)
            src = src.index_select(k, idx)
    return src


def channel_selection(cg: ChannelGraph, sizes: NewWidths, split_factor: int, member: int,
                      seed: int) -> Dict[str, List[torch.Tensor]]:
    """For ``init='inherit'``: which channels of the original member ``member`` keeps, per parameter dim.

    Every channel group draws one random permutation (from ``seed``); member ``i`` takes ``new`` channels
    starting at offset ``i * old / S`` of it, so members share some channels and differ in the rest. The same
    selection is used by every tensor of the group; products and concatenations combine their parts'.

    Args:
        cg: the analysis.
        sizes: the new width of every atom (``PlanDraft.sizes``).
        split_factor: S.
        member: the member's index.
        seed: the seed of the permutations (the same for every member).

    Returns:
        Per parameter/buffer name, per dim, the original's indices the member keeps.
    """
    A, S = cg.atoms, split_factor
    gen = torch.Generator().manual_seed(seed)
    memo: Dict[int, torch.Tensor] = {}

    def atom(a: int) -> torch.Tensor:
        r = A.find(a)
        if r not in memo:
            old, new = A.size[r], sizes.atom(r)
            if A.fixed[r]:
                memo[r] = torch.arange(old)
            elif r in A.prod:
                memo[r] = dim(A.prod[r])
            elif r in A.sum:
                parts, off = [], 0
                for d in A.sum[r]:
                    parts.append(dim(d) + off)
                    off += A.dim_size(d)
                memo[r] = torch.cat(parts)
            else:
                perm = torch.randperm(old, generator=gen)
                start = (member * old) // S
                memo[r] = perm[(torch.arange(new) + start) % old].sort().values
        return memo[r]

    def dim(d) -> torch.Tensor:
        idx = torch.zeros(1, dtype=torch.long)
        for a in d:  # row-major: index = ((i0 * n1) + i1) * n2 + i2 ...
            idx = (idx[:, None] * A.size[A.find(a)] + atom(a)[None, :]).reshape(-1)
        return idx

    return {name: [dim(d) for d in dims] for name, dims in cg.param_dims.items()}


@torch.no_grad()
def inherit_member(member: nn.Module, original: nn.Module, selection: Dict[str, List[torch.Tensor]]) -> None:
    """Initialise a member from a channel subset of the original's weights (``init='inherit'``).

    Conv and linear weights are scaled by ``old fan-in / new fan-in`` so activations keep their scale.
    """
    orig = dict(original.named_parameters())
    orig.update(dict(original.named_buffers()))
    mods = dict(member.named_modules(remove_duplicate=False))
    tensors = dict(member.named_parameters())
    tensors.update(dict(member.named_buffers()))
    for name, t in tensors.items():
        o, sel = orig.get(name), selection.get(name)
        if o is None or sel is None:
            continue
        v = o.detach()
        for k, idx in enumerate(sel):
            if v.shape[k] != len(idx) or not torch.equal(idx, torch.arange(v.shape[k])):
                v = v.index_select(k, idx.to(v.device))
        mod = mods.get(name.rsplit(".", 1)[0] if "." in name else "")
        if name.endswith("weight") and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and t.dim() > 1:
            v = v * (o[0].numel() / max(v[0].numel(), 1))
        t.copy_(v)


def _run_own_init(member: nn.Module) -> str:
    init = getattr(member, "init_weights", None)
    if callable(init):
        try:
            init()
            return "init_weights()"
        except Exception as e:  # noqa: BLE001 - an init that needs arguments we cannot guess
            _logger.debug("init_weights() failed (%s); using the generic init", e)
    fn = getattr(member, "_init_weights", None)
    if callable(fn):
        try:
            member.apply(fn)
            return "_init_weights"
        except Exception as e:  # noqa: BLE001
            _logger.debug("_init_weights failed (%s); using the generic init", e)
    return ""


def check_member(member_meta: nn.Module, input_shape: Sequence[int], out_shape: Sequence[int],
                 free_output: bool = False) -> None:
    """Run a meta member forward and compare its output shape with the original's (all but one feature dim
    where ``free_output``: a headless model's features, pooled or not).

    Raises:
        SplitError: the member does not run, or its output shape differs.
    """
    was = member_meta.training
    member_meta.eval()
    try:
        with torch.no_grad(), MetaRecurrent():
            y = member_meta(torch.empty(tuple(input_shape), device="meta"))
    except Exception as e:  # noqa: BLE001
        raise SplitError(
            f"the rebuilt member does not run: {type(e).__name__}: {e}. A width is probably hard-coded in a "
            "forward (a literal in a reshape) or held in an attribute the rebuild could not match. Report the "
            "model; pass split_factor=1 to get the original."
        ) from e
    finally:
        member_meta.train(was)
    y = y[0] if isinstance(y, (tuple, list)) else y
    differ = [k for k, (a, b) in enumerate(zip(y.shape, out_shape)) if a != b]
    if y.dim() != len(out_shape) or (differ and not (free_output and len(differ) == 1 and differ[0] > 0)):
        raise SplitError(f"the rebuilt member returns shape {tuple(y.shape)}, the original {tuple(out_shape)}")
