"""``split(model, S)``: trace -> analyse -> plan -> rebuild -> ensemble.

The stages live in :mod:`timm_split.trace` and :mod:`timm_split.engine`; this module runs them in order, with
the retry ladder (:data:`~timm_split.engine.analyse.RETRY_LADDER`) around analyse -> plan -> meta member.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .checks import check_split_args, timm_num_classes, unwrap_model
from .engine.analyse import RETRY_LADDER, ChannelGraph, analyse
from .engine.attributes import attribute_ties, drop_divisor, regularization_updates, settle_attributes
from .engine.atoms import NewWidths
from .engine.canonical import CfgAt, Coupled, canonical_copy, coupled_dims, recount_macs, transfer, transfer_selection
from .engine.plan import SplitPlan, plan as _plan
from .engine.rebuild import (build_member, channel_selection, check_member, inherit_member, init_member,
                             reference_stats)
from .engine.tables import recompute_tables
from .ensemble import SplitEnsemble
from .errors import SplitError
from .trace import Trace, drop_user_hooks, input_shape_for, meta_copy, trace

_logger = logging.getLogger(__name__)

__all__ = ["split", "plan_split"]

ImgSize = Union[int, Tuple[int, int], None]


def _check_factor(split_factor) -> int:
    if isinstance(split_factor, bool) or not isinstance(split_factor, int) or split_factor < 1:
        raise ValueError(f"split_factor must be an int >= 1, got {split_factor!r} (e.g. split(model, 2))")
    return split_factor


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class _Planned(NamedTuple):
    """What the pipeline hands from planning to the rebuild."""

    plan: SplitPlan
    trace: Trace  # the user's model's (a _Traced holds its shapes; the rebuild needs only the trace)
    graph: ChannelGraph
    sizes: NewWidths
    canon: Optional[nn.Module] = None  # the copy at the cfg's head it was planned on (engine.canonical)
    coupled: Optional[Coupled] = None  # the model's tensors canon lacks -> the dims they take widths from


@torch.inference_mode(False)  # callable under inference_mode: version counters, trainable members
def plan_split(model: nn.Module, split_factor: int, *, img_size: ImgSize = None, in_chans: Optional[int] = None,
               scale_regularization: bool = True, drop_scale: str = "S", plan_at: str = "cfg",
               params_tol: float = 0.02, macs_tol: float = 0.04, refine: bool = True) -> SplitPlan:
    """Trace, analyse and plan a split, without building members (cheap: works on a meta copy).

    Args:
        model: any timm model or traceable ``nn.Module``; it is not modified.
        split_factor: S, the number of members.
        img_size: the input size to plan at; default the size the model was built for.
        in_chans: input channels, for a model built with another ``in_chans`` than its cfg says.
        scale_regularization: divide dropout and drop-path rates (by ``drop_scale``).
        drop_scale: ``'S'`` (divide by S, SplitNet's ResNet rule) or ``'sqrt'`` (by sqrt(S), the seed's rule for
            SE-ResNet, EfficientNet, PyramidNet and DenseNet).
        plan_at: ``'cfg'`` or ``'model'``: see :func:`split`.
        params_tol: allowed relative params deviation of the ensemble from the original.
        macs_tol: allowed relative MACs deviation.
        refine: end the width search with the move towards the uniform ``1/sqrt(S)`` shrink (docs/plan_shape.md);
            ``False`` gives the plan without it.

    Returns:
        The :class:`~timm_split.engine.plan.SplitPlan`.
    """
    check_split_args(model, split_factor, img_size=img_size, in_chans=in_chans, params_tol=params_tol,
                     macs_tol=macs_tol, scale_regularization=scale_regularization, drop_scale=drop_scale,
                     plan_at=plan_at, refine=refine)
    model = unwrap_model(model, "plan_split", refuse_pruned=False)  # pruning: a SplitError above
    S = _check_factor(split_factor)
    plan_kw = dict(_plan_options(S, params_tol, macs_tol, scale_regularization, drop_scale), refine=bool(refine))
    return _planned(model, S, img_size, in_chans, _check_plan_at(plan_at), plan_kw).plan


def _plan_options(S: int, params_tol: float, macs_tol: float, scale_regularization: bool, drop_scale: str) -> dict:
    """The planner's keyword options, with ``drop_scale``'s name checked."""
    drop_divisor(S, drop_scale)  # raises ValueError for an unknown name
    return dict(params_tol=params_tol, macs_tol=macs_tol, scale_regularization=scale_regularization,
                drop_scale=drop_scale)


def _check_plan_at(plan_at: str) -> str:
    if plan_at not in ("cfg", "model"):
        raise ValueError(f"plan_at must be 'cfg' (the backbone planned at the architecture's head and input, as "
                         f"timm checkpoints expect) or 'model' (parity at this model's own head), got {plan_at!r}")
    return plan_at


class _Traced(NamedTuple):
    """The user's model traced once: its trace, input and output shapes, and whether it is headless (its output
    is features, whose width may change)."""

    trace: Trace
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    headless: bool


def _traced(model: nn.Module, shape: Tuple[int, ...]) -> _Traced:
    """The trace of a meta copy of ``model`` at ``shape``."""
    tr = trace(meta_copy(model), shape)
    out = [n for n in tr.graph.nodes if n.op == "output"][0].args[0]
    out_shape = tuple((out[0] if isinstance(out, tuple) else out).meta["val"].shape)
    return _Traced(tr, tuple(shape), out_shape, timm_num_classes(model) == 0)  # timm: num_classes <= 0, no head


def _planned(model, S, img_size, in_chans, plan_at, plan_kw) -> _Planned:
    """The plan of the backbone at the cfg's head, input and size (engine.canonical) where the model has another,
    carried over to the model; else (or where that fails) the plan of the model itself. The model is traced once."""
    shape = input_shape_for(model, img_size, in_chans=in_chans)
    own = _traced(model, shape)
    found = canonical_copy(model, shape) if S > 1 and plan_at == "cfg" else None
    if found is not None:
        try:
            return _carried_over(model, own, found, S, plan_kw)
        except SplitError as e:
            _logger.warning("%s: the plan at the cfg's %s does not carry over (%s); planning at this model's own, "
                            "so its backbone widths differ from the default's", _arch(model), found[1], e)
    return _ladder(own, S, _arch(model), plan_kw)


def _carried_over(model: nn.Module, own: _Traced, found: Tuple[nn.Module, CfgAt], S: int, plan_kw: dict) -> _Planned:
    """The plan made on the copy at the cfg (``found``), transferred to the model and checked on its member."""
    canon, at = found
    made = _ladder(_traced(canon, (own.in_shape[0], at.in_chans, *at.img_size)), S, _arch(model), plan_kw,
                   recount=False)
    tr = own.trace
    coupled = _coupled(tr, canon, own.headless)
    p = transfer(made.plan, canon, tr.model, at, own.in_shape[1:], coupled)
    if plan_kw["scale_regularization"]:  # the model's own rates (a registered copy has the default's)
        p = dataclasses.replace(p, regularization=regularization_updates(tr.model, S, plan_kw["drop_scale"]))
    member = build_member(tr.model, p, torch.device("meta"), {}, tr.aliases)
    check_member(member, own.in_shape, own.out_shape, own.headless)
    p = _recounted(p, tr.model, member, own.in_shape)  # this model's MACs (its head, its size), as count() does
    if at.img_size != tuple(own.in_shape[2:]):
        if abs(p.macs_ratio - 1) > plan_kw["macs_tol"]:
            _logger.warning("%s: planned at the cfg's size %s so that its checkpoints load at any size; at %s "
                            "the MACs ratio is %.4f. For MACs parity at this size, split with plan_at='model'",
                            _arch(model), at.img_size, tuple(own.in_shape[2:]), p.macs_ratio)
    return _Planned(p, tr, made.graph, made.sizes, canon, coupled)


def _coupled(tr: Trace, canon: nn.Module, headless: bool) -> Optional[Coupled]:
    """:func:`coupled_dims` of the traced model, analysed only where it has tensors ``canon`` lacks."""
    names = {n for n, _ in canon.named_parameters()} | {n for n, _ in canon.named_buffers()}
    own = [n for n, _ in (*tr.model.named_parameters(), *tr.model.named_buffers())]
    if all(n in names for n in own):
        return None
    return coupled_dims(analyse(tr, dataclasses.replace(RETRY_LADDER[0], free_output=headless)), canon)


def _recounted(p: SplitPlan, model: nn.Module, member: nn.Module, shape: Tuple[int, ...]) -> SplitPlan:
    """:func:`recount_macs`, or ``p`` as planned where the meta count cannot run the model (logged). The count's
    own warnings (ops it skips) are for those who call ``count()``; a split does not repeat them."""
    counter = logging.getLogger("timm_split.count")
    level = counter.level
    counter.setLevel(logging.ERROR)
    try:
        return recount_macs(p, model, member, shape)
    except (RuntimeError, ValueError) as e:
        _logger.info("%s: the plan keeps the planner's MAC count (count() cannot run it on meta: %s)", p.arch, e)
        return p
    finally:
        counter.setLevel(level)


def _ladder(traced: _Traced, S: int, arch: str, plan_kw: dict, recount: bool = True) -> _Planned:
    """(analyse -> plan -> meta member) on a trace, up the retry ladder until a meta member runs. With
    ``recount``, the plan's MACs are then counted by :func:`~timm_split.count.count` on the model and the member
    (the planner's own cost model leaves out fvcore's global-pool term), so ``print(plan)`` shows the numbers
    ``timm-split compare`` and ``count()`` show."""
    tr, shape, out_shape, headless = traced
    error: Optional[SplitError] = None
    ambiguous: tuple = ()
    for i, options in enumerate(RETRY_LADDER):
        cg = analyse(tr, dataclasses.replace(options, free_output=headless))
        if options.tie_attributes and not attribute_ties(cg, ambiguous):
            continue  # no groups to tie: nothing new to try here
        draft = _plan(cg, S, arch=arch, **plan_kw)
        member = build_member(tr.model, draft.plan, torch.device("meta"), {}, tr.aliases)
        ambiguous = draft.ambiguous
        p = settle_attributes(member, draft.plan, draft.ambiguous, draft.module_io)
        try:
            check_member(member, shape, out_shape, headless)
            if recount:
                p = _recounted(p, tr.model, member, shape)
            return _Planned(p, tr, cg, draft.sizes)
        except SplitError as e:
            error = e
            if i + 1 < len(RETRY_LADDER):
                _logger.info("%s: the member does not run (%s); re-planning with %s", p.arch, e.__cause__ or e,
                             RETRY_LADDER[i + 1].adds)
    raise error


def _pretrained_cfg(model: nn.Module, plan: SplitPlan) -> dict:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.setdefault("input_size", tuple(plan.input_size))
    arch = cfg.get("architecture") or plan.arch
    cfg.update(architecture=f"splitnet_{arch}", split_factor=plan.split_factor, base_architecture=arch)
    for k in ("hf_hub_id", "url", "file", "tag"):
        cfg.pop(k, None)
    return cfg


@torch.inference_mode(False)  # members are trainable tensors even when split() is called under inference_mode
def split(model: nn.Module, split_factor: int, *, seed: int = 0, img_size: ImgSize = None,
          in_chans: Optional[int] = None, scale_regularization: bool = True, drop_scale: str = "S",
          plan_at: str = "cfg", averaging: str = "logits", init: str = "random", params_tol: float = 0.02,
          macs_tol: float = 0.04) -> SplitEnsemble:
    """Divide ``model`` into ``split_factor`` thinner members that together cost what it does.

    Args:
        model: any timm model or traceable ``nn.Module`` (CPU, GPU or ``meta``). It is never modified.
        split_factor: S, an int >= 1. S=1 returns a one-member ensemble equal to a copy of the model.
        seed: members get seeds ``seed, seed+1, ...`` for their init (the global RNG is left untouched).
        img_size: the input size to plan at; default the size the model was created at (its ``pretrained_cfg``
            where it keeps none).
        in_chans: input channels, for a model built with another ``in_chans`` than its cfg says.
        scale_regularization: divide dropout and drop-path rates (SplitNet's rule), by ``drop_scale``.
        drop_scale: ``'S'`` (p/S, SplitNet's ResNet rule; the default) or ``'sqrt'`` (p/sqrt(S), the seed's rule
            for SE-ResNet, EfficientNet, PyramidNet and DenseNet). ``print(ens.split_plan)`` shows the rates set.
        plan_at: ``'cfg'`` (default): a timm model created with another ``num_classes`` or ``in_chans`` than its
            ``pretrained_cfg``, or at another ``img_size`` (models with ``set_input_size``), has its backbone
            planned at the cfg's, so the backbone is the same for every head and size and a checkpoint fine-tunes
            onto another head or size as timm's do; the plan says how much this model's head moves parity, and
            counts MACs at this model's size. ``'model'``: planned at this model's own head and size (parity exact
            there, widths depend on them).
        averaging: ``'logits'`` (mean of logits) or ``'probs'`` (log of mean probabilities).
        init: ``'random'`` (each member from scratch, the family's init) or ``'inherit'`` (warm start: member
            ``i`` takes its own channel subset of ``model``'s trained weights).
        params_tol: allowed relative deviation of the ensemble's params from the original's.
        macs_tol: allowed relative deviation of the ensemble's MACs.

    Returns:
        A :class:`~timm_split.ensemble.SplitEnsemble` on the model's device; a meta model gives a meta
        ensemble (no memory, no compute).

    The model is normalised at the door (:func:`~timm_split.checks.unwrap_model`): a model inside
    ``nn.DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` is split as the module inside, and
    timm's ``num_classes <= 0`` (``-1`` included) is no classifier, as ``0``.

    Raises:
        ValueError: ``split_factor`` is not an int >= 1, or so large a channel group would vanish; any keyword
            option outside its domain (:func:`~timm_split.checks.check_split_args`), before any tracing.
        SplitError: the model has a construct the engine cannot handle (the message names the node): pruning or
            other weight reparametrisations, or a forward that returns a tuple, list or dict instead of one tensor.
    """
    check_split_args(model, split_factor, img_size=img_size, in_chans=in_chans, seed=seed, params_tol=params_tol,
                     macs_tol=macs_tol, scale_regularization=scale_regularization, drop_scale=drop_scale,
                     plan_at=plan_at, averaging=averaging, init=init)
    model = unwrap_model(model, "split", refuse_pruned=False)  # pruning: a SplitError above
    S = _check_factor(split_factor)
    if init not in ("random", "inherit"):
        raise ValueError(f"init must be 'random' or 'inherit', got {init!r}")
    if S == 1:
        member = copy.deepcopy(model)
        for m in member.modules():  # members never carry the user's hooks (see trace.meta_copy)
            drop_user_hooks(m)
        p = plan_split(model, 1, img_size=img_size, in_chans=in_chans, scale_regularization=False)
        return SplitEnsemble([member], p, _pretrained_cfg(model, p), averaging)
    plan_kw = _plan_options(S, params_tol, macs_tol, scale_regularization, drop_scale)
    planned = _planned(model, S, img_size, in_chans, _check_plan_at(plan_at), plan_kw)
    members = _rebuild(model, planned, init, seed)
    p = planned.plan
    _logger.info("split %s into %d members: params ratio %.4f, MACs ratio %.4f", p.arch, S, p.params_ratio,
                 p.macs_ratio)
    return SplitEnsemble(members, p, _pretrained_cfg(model, p), averaging)


def _rebuild(model: nn.Module, planned: _Planned, init: str, seed: int) -> list:
    """The S members, on the model's device, initialised (meta members stay empty)."""
    p, tr, S = planned.plan, planned.trace, planned.plan.split_factor
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    dtypes = {n: t.dtype for n, t in tensors.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    members = []
    stats = reference_stats(model) if device.type != "meta" and init == "random" else {}
    for i in range(S):
        m = build_member(tr.model, p, device, dtypes, tr.aliases)
        if device.type != "meta" and init == "inherit":
            selection = channel_selection(planned.graph, planned.sizes, S, i, seed)
            if planned.canon is not None:
                selection = transfer_selection(selection, planned.canon, model, planned.coupled)
            inherit_member(m, model, selection)
        elif device.type != "meta":
            init_member(m, stats, seed + i)
        if device.type != "meta":
            recompute_tables(m)
        m.train(model.training)
        members.append(m)
    return members
