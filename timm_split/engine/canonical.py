"""Plan the backbone once, at the architecture's own head, input channels and image size.

The classifier (``C x num_classes``) and the stem's input (``in_chans x C x k x k``) are parity terms: planned on
the model as created, ``resnet18(num_classes=10)`` would get other backbone widths than ``resnet18`` (360 against
368 channels in ``layer4.0.conv2``), and a checkpoint saved at 1000 classes would not load at 10. The image size
moves attention MACs: ``swin_tiny`` created at ``img_size=448, window_size=14`` would get an MLP width of 264
where the default has 272. So a timm model whose head, input channels or (where it keeps one and can be resized
with ``set_input_size``) image size differ from its ``pretrained_cfg`` is planned on a meta copy at the cfg's
(:func:`canonical_copy`); :func:`transfer` then gives every tensor the planned width except the dims where the
model differs from that copy (the classes, the input channels, the position table's length), which keep the
model's own. A model that is its registered architecture created with another head, input or size is planned on
that architecture's default (:func:`_registered_default`): a ``reset_classifier`` need not build the constructor's
head. Tensors the copy lacks take the widths of the dims they are coupled to (:func:`coupled_dims`). Resizing
scales what a model chose for its size (Swin's windows follow the grid), so where the registered architecture is
the model resized, that registered model at its cfg is the copy (:func:`_registered`). The plan records where it
was made (``SplitPlan.planned_at``) and the parity there (``SplitPlan.planned_params``), so a user sees how much
the head moves it; its MACs are counted at the model's own size.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from ..count import count
from ..trace import MetaRecurrent, first_convs, meta_copy, size_built_at
from .analyse import ChannelGraph
from .attributes import DROP_ATTRS
from .plan import SplitPlan

_logger = logging.getLogger(__name__)

__all__ = ["CfgAt", "cfg_at", "canonical_copy", "coupled_dims", "recount_macs", "transfer", "transfer_selection"]

# per tensor the copy lacks, per dim: a (tensor, dim) both have, in the same channel class; or None
Coupled = Dict[str, Tuple[Optional[Tuple[str, int]], ...]]


class CfgAt(NamedTuple):
    """Where a plan is made: the cfg's head, input channels and image size."""

    num_classes: int
    in_chans: int
    img_size: Tuple[int, int]


def cfg_at(model: nn.Module) -> Optional[CfgAt]:
    """The model's ``pretrained_cfg`` head, input channels and size, or None for a model without a timm cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n, size = cfg.get("num_classes"), cfg.get("input_size")
    if not isinstance(n, int) or not size or not callable(getattr(model, "reset_classifier", None)):
        return None
    return CfgAt(n, int(size[0]), (int(size[-2]), int(size[-1])))


def canonical_copy(model: nn.Module, input_shape: Sequence[int]) -> Optional[Tuple[nn.Module, CfgAt]]:
    """A meta copy of ``model`` at its cfg's head, input channels and image size, where they differ from the model's.

    The image size is the cfg's only for a model that keeps the size it was created at (``patch_embed.img_size``)
    and has timm's ``set_input_size``; other models keep the size they are traced at. A model created without
    pooling (``num_classes=0, global_pool=''``) gets the first of timm's pool types that makes the copy run with a
    classifier.

    Args:
        model: a timm model (not modified).
        input_shape: ``(B, C, H, W)`` the model takes.

    Returns:
        ``(copy, where)`` with the cfg's values, or None where the model already has them (or has no cfg, or its
        head, first conv or size cannot be reset).
    """
    at = cfg_at(model)
    if at is None:
        return None
    own = tuple(input_shape[2:])
    if own != at.img_size and not (size_built_at(model) and callable(getattr(model, "set_input_size", None))):
        at = at._replace(img_size=own)
    if (getattr(model, "num_classes", None), input_shape[1], own) == tuple(at):
        return None
    shape = (input_shape[0], at.in_chans, *at.img_size)
    ref = _registered_default(model, at, (int(input_shape[1]), *own), shape)
    if ref is not None:
        return ref, at
    for pool in (None, *POOLS):
        canon = _reset(model, at, own, int(input_shape[1]), pool)
        if canon is not None and _runs(canon, shape):
            if at.img_size != own:
                canon = _registered(canon, model, shape, own) or canon
            return canon, at
    _logger.info("%s: no copy at the cfg's head and size runs; planning at the model's own", type(model).__name__)
    return None


# timm's global_pool values, tried in turn for a model created without pooling
POOLS = ("avg", "token", "fast", "max")


def _reset(model: nn.Module, at: CfgAt, own_size: Tuple[int, int], own_chans: int,
           pool: Optional[str]) -> Optional[nn.Module]:
    canon = meta_copy(model)
    try:
        with torch.device("meta"):
            if canon.num_classes != at.num_classes or pool is not None:
                n = at.num_classes
                canon.reset_classifier(n) if pool is None else canon.reset_classifier(n, pool)
            if own_chans != at.in_chans and not _set_in_chans(canon, own_chans, at.in_chans):
                return None
            if at.img_size != own_size:
                canon.set_input_size(img_size=at.img_size)
    except Exception as e:  # noqa: BLE001 - a model's own reset_classifier / set_input_size
        _logger.debug("resetting to %s (pool %s) failed: %s", at, pool, e)
        return None
    return canon


def _registered_default(model: nn.Module, at: CfgAt, own: Tuple[int, int, int],
                        shape: Sequence[int]) -> Optional[nn.Module]:
    """The registered architecture at its defaults, on meta, where ``model`` is that architecture created with
    only another ``num_classes``, ``in_chans`` or ``img_size`` (and dropout rates); else None.

    This is the model a timm user fine-tunes from: ``reset_classifier`` need not rebuild the head the constructor
    builds (RepViT's distillation head has a BatchNorm only when made with the model), so the model reset to the
    cfg's head is not always the default.
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        return None
    kw = dict(num_classes=model.num_classes, in_chans=own[0])
    if own[1:] != at.img_size:
        kw["img_size"] = own[1:]
    try:
        with torch.device("meta"):
            same, ref = (timm.create_model(arch, pretrained=False, **k) for k in (kw, {}))
    except Exception as e:  # noqa: BLE001 - the registry's own entrypoint
        _logger.debug("%s: no registered copy with %s (%s)", arch, kw, e)
        return None
    if cfg_at(ref) != at or getattr(ref, "num_classes", None) != at.num_classes or not _same_build(same, model):
        return None
    ref.train(model.training)
    return ref if _runs(ref, shape) else None


def _same_build(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models have the same modules, tensor shapes and plain attributes (dropout rates aside)."""
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    if list(ma) != list(mb) or any(_kind(ma[n]) is not _kind(m) for n, m in mb.items()) or _shapes(a) != _shapes(b):
        return False
    for n, m in mb.items():
        if _kind(m) is not _Drop:
            pa, pb = _plain(ma[n]), _plain(m)
            if any(pa.get(k) != v for k, v in pb.items() if k not in DROP_ATTRS and k != "training"):
                return False
    return True


def _registered(canon: nn.Module, model: nn.Module, shape: Sequence[int],
                own: Tuple[int, int]) -> Optional[nn.Module]:
    """The registered architecture at its cfg, on meta, where it is ``model`` but for the size (``canon`` is
    ``model`` resized); else None.

    ``set_input_size`` scales what the model chose for its size: Swin created at 232 x 248 px with 7 px windows,
    resized to 224, gets 6 px windows, and SwinV2 at 448 px gets windows the registered model does not have at
    256, so the widths planned on the resized copy are not the default's and a default checkpoint does not load.
    The registered model has the default's windows. It stands in for ``canon`` only where it has the same modules,
    tensors and plain attributes, apart from what resizing changed (and dropout rates, which the plan takes from
    the model itself).
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        return None
    try:
        with torch.device("meta"):
            ref = timm.create_model(arch, pretrained=False).train(canon.training)
    except Exception as e:  # noqa: BLE001 - the registry's own entrypoint
        _logger.debug("%s: no registered copy (%s)", arch, e)
        return None
    if not _same_but_size(ref, canon, model, own) or not _runs(ref, shape):
        return None
    return ref


def _same_but_size(ref: nn.Module, canon: nn.Module, model: nn.Module, own: Tuple[int, int]) -> bool:
    """Whether ``ref`` has ``canon``'s modules, parameter shapes and plain attributes, apart from what depends on
    the size (what resizing changes in ``model`` or in ``ref``; computed buffers such as attention masks) and
    dropout rates."""
    ref_sized = meta_copy(ref)
    try:
        ref_sized.set_input_size(img_size=own)
    except Exception:  # noqa: BLE001 - the model's own set_input_size
        return False
    mods, base_mods, ref_mods, resized = (dict(m.named_modules()) for m in (canon, model, ref, ref_sized))
    if list(ref_mods) != list(mods) or any(_kind(ref_mods[n]) is not _kind(m) for n, m in mods.items()):
        return False
    r, c, o = (dict((n, tuple(p.shape)) for n, p in m.named_parameters()) for m in (ref, canon, model))
    if set(r) != set(c) or any(r[n] != c[n] for n in c if c[n] == o.get(n)):
        return False
    for path, m in mods.items():
        a, b, base, a2 = (_plain(x) for x in (ref_mods[path], m, base_mods.get(path, m), resized[path]))
        if _kind(m) is not _Drop and any(a.get(k) != v for k, v in b.items()
                                         if v == base.get(k) and a.get(k) == a2.get(k) and k not in DROP_ATTRS):
            return False
    return True


class _Drop:
    """The kind of a dropout or drop-path layer, or the ``nn.Identity`` timm puts in its place at rate 0."""


def _kind(mod: nn.Module) -> type:
    drop = isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)) or "drop_prob" in vars(mod)
    return _Drop if drop and not any(True for _ in mod.parameters()) else type(mod)


def _plain(mod: nn.Module) -> Dict[str, object]:
    """A module's attributes of plain values: numbers, strings, None and tuples of them."""
    def plain(v: object) -> bool:
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, tuple) and all(plain(x) for x in v))
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and plain(v)}


def _runs(model: nn.Module, shape: Sequence[int]) -> bool:
    was = model.training
    try:
        with torch.no_grad(), MetaRecurrent():
            y = model.eval()(torch.empty(tuple(shape), device="meta"))
        y = y[0] if isinstance(y, (tuple, list)) else y
        return y.dim() == 2
    except Exception:  # noqa: BLE001 - any failure means: not this copy
        return False
    finally:
        model.train(was)


def _set_in_chans(model: nn.Module, own: int, c0: int) -> bool:
    """Give the first convs (or a linear patch embedding, NaFlexViT's) the input of ``c0`` channels where they now
    take ``own``: their input width scaled by ``c0 / own``, which keeps a space-to-depth stem's factor (TResNet's
    first conv takes 16 x the image's channels)."""
    convs = first_convs(model)
    if not convs or not all(_in_width(m) > 0 and _in_width(m) % own == 0 for m in convs):
        return False
    for m in convs:
        n = _in_width(m) // own * c0
        if isinstance(m, nn.Linear):
            m.in_features = n
            shape = (m.out_features, n)
        else:
            m.in_channels = n
            shape = (m.out_channels, n, *m.kernel_size)
        m.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=m.weight.requires_grad)
    return True


def _in_width(mod: nn.Module) -> int:
    """A first conv's input channels (0 where it is not a plain conv or linear layer, which is not adapted)."""
    if isinstance(mod, nn.Conv2d) and mod.groups == 1:
        return mod.in_channels
    return mod.in_features if isinstance(mod, nn.Linear) else 0


def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return out


def _differs(canon: Dict[str, Tuple[int, ...]], own: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[bool, ...]]:
    """Per tensor of ``own`` that is not as in ``canon``: which dims differ (all, for a tensor ``canon`` lacks)."""
    out = {}
    for name, shape in own.items():
        c = canon.get(name)
        if c is None or len(c) != len(shape):
            out[name] = (True,) * len(shape)
        elif c != shape:
            out[name] = tuple(a != b for a, b in zip(c, shape))
    return out


def coupled_dims(cg: ChannelGraph, canon: nn.Module) -> Coupled:
    """Where the model (analysed as ``cg``) has tensors ``canon`` lacks, the dims they share a channel class with.

    A model's ``reset_classifier`` need not build the head its constructor builds: RepViT's distillation head
    keeps a BatchNorm only when made with the model, and Hiera's classifier exists only at ``num_classes > 0``,
    while its cfg has 0. Such a tensor takes, per dim, the width (and the inherited channels) of a dim of a tensor
    both have, unchanged, in the same class of the model's analysis; a dim with none keeps the model's own.
    """
    base = _shapes(canon)
    diff = _differs(base, {n: tuple(cg.atoms.dim_size(d) for d in dims) for n, dims in cg.param_dims.items()})
    ref: Dict[int, Tuple[str, int]] = {}
    for name, dims in cg.param_dims.items():
        mask = diff.get(name, (False,) * len(dims))
        for j, d in enumerate(dims):
            if name in base and not mask[j] and len(d) == 1:
                ref.setdefault(cg.atoms.find(d[0]), (name, j))
    return {name: tuple(ref.get(cg.atoms.find(d[0])) if len(d) == 1 else None for d in dims)
            for name, dims in cg.param_dims.items() if name not in base}


def transfer(plan: SplitPlan, canon: nn.Module, model: nn.Module, at: CfgAt,
             input_size: Sequence[int], coupled: Optional[Coupled] = None) -> SplitPlan:
    """The plan made on ``canon`` for ``model``: the planned widths, the model's own classes, input channels and
    size-dependent lengths (position tables), and only the planned attributes the model has as ``canon`` had them.
    A tensor ``canon`` lacks takes its widths from the dims it is ``coupled`` to (:func:`coupled_dims`).

    Args:
        plan: the plan of ``canon``.
        canon: the copy it was made on (:func:`canonical_copy`).
        model: the model to split.
        at: where the plan was made.
        input_size: ``(C, H, W)`` of the model's input.
        coupled: :func:`coupled_dims` of the model, where it has tensors ``canon`` lacks.

    Returns:
        The plan for ``model``. Its ``params`` count the model's head; its ``macs`` are those planned (see
        :func:`recount_macs` for another size); ``planned_at`` and ``planned_params`` say where it was made.
    """
    base, own = _shapes(canon), _shapes(model)
    shapes = {}
    for name, shape in own.items():
        if name not in plan.param_shapes and name in base:
            continue  # a tied alias: the owner carries the shape
        planned = plan.param_shapes.get(name, shape)
        mask = _differs(base, {name: shape}).get(name, (False,) * len(shape))
        shapes[name] = tuple(o if d else p for p, o, d in zip(planned, shape, mask))
    for name, refs in (coupled or {}).items():
        if name in shapes:
            shapes[name] = tuple(shapes[r[0]][r[1]] if r else n for n, r in zip(shapes[name], refs))
    buffers = {n for n, _ in model.named_buffers()} | {n for n, _ in canon.named_buffers()}
    d0 = sum(_numel_of(own.get(n)) - _numel_of(base.get(n)) for n in set(own) | set(base) if n not in buffers)
    d1 = sum(_numel_of(shapes.get(n)) - _numel_of(plan.param_shapes.get(n))
             for n in set(shapes) | set(plan.param_shapes) if n not in buffers)
    S, mods = plan.split_factor, dict(model.named_modules(remove_duplicate=False))
    return dataclasses.replace(
        plan, param_shapes=shapes, attributes=tuple(a for a in plan.attributes if _has_attr(mods, a)),
        regularization=tuple(r for r in plan.regularization if r[0] in mods),
        params=(plan.params[0] + d0, plan.params[1] + S * d1),
        input_size=tuple(input_size), planned_at=tuple(at._asdict().items()), planned_params=plan.params)


def _has_attr(mods: Dict[str, nn.Module], attribute: tuple) -> bool:
    """Whether the model has a planned attribute ``(module, name, old, new)`` with the value it had in the copy
    (a size-dependent one, e.g. a feature-map size, keeps the model's own)."""
    path, name, old = attribute[:3]
    return path in mods and getattr(mods[path], name, None) == old


def recount_macs(plan: SplitPlan, model: nn.Module, member: nn.Module, input_shape: Sequence[int]) -> SplitPlan:
    """``plan`` with its MACs counted on ``model`` and one ``member`` (meta, :func:`~timm_split.count.count`) at
    ``input_shape``, for a plan made at another image size. Counted as the planner counts (``Cost.gmacs``: every
    op fvcore and timm_split count, per image), so a recounted plan prints on the same basis as any other."""
    size, chans = tuple(input_shape[2:]), int(input_shape[1])
    m0 = count(model, size, in_chans=chans, device="meta").gmacs * 1e9
    m1 = count(member, size, in_chans=chans, device="meta").gmacs * 1e9
    return dataclasses.replace(plan, macs=(m0, plan.split_factor * m1))


def _numel_of(shape: Optional[Tuple[int, ...]]) -> int:
    if shape is None:
        return 0
    n = 1
    for s in shape:
        n *= s
    return n


def transfer_selection(selection: Dict[str, List[torch.Tensor]], canon: nn.Module, model: nn.Module,
                       coupled: Optional[Coupled] = None) -> Dict[str, List[torch.Tensor]]:
    """``init='inherit'``'s channel selection made on ``canon``, for ``model``: the dims where the model differs
    from ``canon`` (classes, input channels) are taken whole; a tensor ``canon`` lacks takes the channels of the
    dims it is ``coupled`` to (:func:`coupled_dims`), else whole."""
    own = _shapes(model)
    diff = _differs(_shapes(canon), own)
    out = {}
    for name, shape in own.items():
        dims, mask = selection.get(name), diff.get(name)
        if name in (coupled or {}):
            dims = [_picked(selection, r) for r in coupled[name]]
            mask = tuple(i is None for i in dims)
        if mask is None:
            if dims is not None:
                out[name] = dims
            continue
        dims = dims if dims is not None and len(dims) == len(shape) else [None] * len(shape)
        out[name] = [torch.arange(n) if m or idx is None else idx for n, idx, m in zip(shape, dims, mask)]
    return out


def _picked(selection: Dict[str, List[torch.Tensor]], ref: Optional[Tuple[str, int]]) -> Optional[torch.Tensor]:
    dims = selection.get(ref[0]) if ref else None
    return dims[ref[1]] if dims is not None and ref[1] < len(dims) else None
