"""Plan the backbone once, at the architecture's own head, input channels and image size.

The classifier (``C x num_classes``) and the stem's input (``in_chans x C x k x k``) are parity terms: planned on
the model as created, ``resnet18(num_classes=10)`` would get other backbone widths than ``resnet18`` (360 against
368 channels in ``layer4.0.conv2``), and a checkpoint saved at 1000 classes would not load at 10. The image size
moves attention MACs: ``swin_tiny`` created at ``img_size=448, window_size=14`` would get an MLP width of 264
where the default has 272. So a timm model whose head, input channels or (where it keeps one and can be resized
with ``set_input_size``) image size differ from its ``pretrained_cfg`` is planned on a meta copy at the cfg's
(:func:`canonical_copy`); :func:`transfer` then gives every tensor the planned width except the dims where the
model differs from that copy (the classes, the input channels, the position table's length), which keep the
model's own. The copy is the registered architecture at its defaults where that is the model up to the declared
differences (head, stem input, size, dropout rates), else the model reset to its cfg; one comparator
(:func:`changes`) decides. Tensors the copy lacks take the widths of the dims they are coupled to
(:func:`coupled_dims`). The plan records where it was made (``SplitPlan.planned_at``) and the parity there
(``SplitPlan.planned_params``), so a user sees how much the head moves it; its MACs are counted at the model's own
size.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import timm
import torch
from torch import nn

from ..count import count
from ..trace import MetaRecurrent, first_convs, meta_copy, size_built_at
from .analyse import ChannelGraph
from .attributes import DROP_ATTRS
from .plan import SplitPlan

_logger = logging.getLogger(__name__)

__all__ = ["CfgAt", "cfg_at", "canonical_copy", "changes", "coupled_dims", "recount_macs", "reset_to_cfg", "transfer",
           "transfer_selection"]

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

    One principle: two candidates, the registered architecture at its defaults and the model reset to the cfg
    (:func:`reset_to_cfg`), and the first that runs at the cfg's input and equals the model up to the declared
    differences (:func:`changes`: what moving either between the model's place and the cfg's changes, which is
    the head, the stem's input and what depends on the size; dropout rates never count) is the copy. The
    registered default comes first: it is the model a timm user fine-tunes from, and ``reset_classifier`` need not
    rebuild the head the constructor builds (RepViT's distillation head has a BatchNorm only when made with the
    model), nor ``set_input_size`` the windows the registered model has (Swin).

    The image size is the cfg's only for a model that keeps the size it was created at (``patch_embed.img_size``)
    and has timm's ``set_input_size``; other models keep the size they are traced at.

    Args:
        model: a timm model (not modified).
        input_shape: ``(B, C, H, W)`` the model takes.

    Returns:
        ``(copy, where)`` with the cfg's values, or None where the model already has them (or has no cfg, or no
        candidate qualifies).
    """
    at = cfg_at(model)
    if at is None:
        return None
    own = (int(input_shape[1]), *(int(s) for s in input_shape[2:]))
    if own[1:] != at.img_size and not (size_built_at(model) and callable(getattr(model, "set_input_size", None))):
        at = at._replace(img_size=own[1:])
    if (getattr(model, "num_classes", None), *own) == (at.num_classes, at.in_chans, *at.img_size):
        return None
    shape = (input_shape[0], at.in_chans, *at.img_size)
    ref, same = _registered(model, at, own)
    canon = reset_to_cfg(model, at, own, shape)
    declared = changes(model, canon) | changes(ref, same)
    for candidate in (ref, canon):
        if candidate is not None and not (changes(candidate, model) - declared) and _runs(candidate, shape):
            return candidate.train(model.training), at
    _logger.info("%s: no copy at the cfg's head and size runs; planning at the model's own", type(model).__name__)
    return None


# timm's global_pool values, tried in turn for a model created without pooling
POOLS = ("avg", "token", "fast", "max")


def reset_to_cfg(model: nn.Module, at: CfgAt, own: Tuple[int, ...], shape: Sequence[int]) -> Optional[nn.Module]:
    """A meta copy of ``model`` with the cfg's head (``reset_classifier``), input channels (:func:`_set_in_chans`)
    and size (``set_input_size``) that runs at ``shape``, or None. A model created without pooling
    (``num_classes=0, global_pool=''``) gets the first of timm's pool types that makes the copy run."""
    for pool in (None, *POOLS):
        canon = meta_copy(model)
        try:
            with torch.device("meta"):
                if canon.num_classes != at.num_classes or pool is not None:
                    n = at.num_classes
                    canon.reset_classifier(n) if pool is None else canon.reset_classifier(n, pool)
                if own[0] != at.in_chans and not _set_in_chans(canon, own[0], at.in_chans):
                    return None
                if at.img_size != own[1:]:
                    canon.set_input_size(img_size=at.img_size)
        except Exception as e:  # noqa: BLE001 - a model's own reset_classifier / set_input_size
            _logger.debug("resetting to %s (pool %s) failed: %s", at, pool, e)
            continue
        if _runs(canon, shape):
            return canon
    return None


def _registered(model: nn.Module, at: CfgAt, own: Tuple[int, ...]) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The registered architecture of ``model`` on meta at its defaults (where its cfg is ``at``), and built at
    the model's head, input channels and size; ``(None, None)`` where there is none."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        return None, None
    kw = dict(num_classes=model.num_classes, in_chans=own[0])
    if own[1:] != at.img_size:
        kw["img_size"] = own[1:]
    with torch.device("meta"):
        try:
            ref = timm.create_model(arch, pretrained=False)
        except Exception as e:  # noqa: BLE001 - the registry's own entrypoint
            _logger.debug("%s: no registered copy (%s)", arch, e)
            return None, None
        if cfg_at(ref) != at or getattr(ref, "num_classes", None) != at.num_classes:
            return None, None
        try:
            same = timm.create_model(arch, pretrained=False, **kw)
        except Exception as e:  # noqa: BLE001 - the registry's own entrypoint
            _logger.debug("%s: no registered copy with %s (%s)", arch, kw, e)
            same = None
    return ref, same


def changes(a: Optional[nn.Module], b: Optional[nn.Module]) -> Set[Tuple[str, str]]:
    """What differs between two models: ``(module, '')`` for a module one lacks or of another kind,
    ``(tensor, 'shape')`` for a tensor one lacks or of another shape, ``(module, attr)`` for a plain attribute
    (a number, string or tuple of them) of another value. Dropout and drop-path layers are one kind, whatever
    their rates (nor do the rates count). Empty where either is None.

    This is the one comparator of :func:`canonical_copy`: a candidate qualifies where ``changes(candidate,
    model)`` lies within the declared differences."""
    if a is None or b is None:
        return set()
    out: Set[Tuple[str, str]] = set()
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    for path in ma.keys() | mb.keys():
        x, y = ma.get(path), mb.get(path)
        if x is None or y is None or _kind(x) is not _kind(y):
            out.add((path, ""))
        elif _kind(x) is not _Drop:
            pa, pb = _plain(x), _plain(y)
            out |= {(path, k) for k in pa.keys() | pb.keys()
                    if k not in DROP_ATTRS and k != "training" and pa.get(k) != pb.get(k)}
    sa, sb = _shapes(a), _shapes(b)
    out |= {(n, "shape") for n in sa.keys() | sb.keys() if sa.get(n) != sb.get(n)}
    return out


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
    ``input_shape`` (``Cost.gmacs``: every op fvcore and timm_split count, per image). :func:`timm_split.split`
    recounts every plan so, so the plan prints the numbers :func:`~timm_split.count.count` and ``timm-split compare``
    print (the planner's cost model leaves out fvcore's global-pool term)."""
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
