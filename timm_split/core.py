"""``split(model, S)``: trace -> analyse -> plan -> rebuild -> ensemble."""
from __future__ import annotations

import copy
import logging
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .analyse import analyse
from .checks import check_split_args
from .errors import SplitError
from .ensemble import SplitEnsemble
from .plan import SplitPlan, attribute_ties, plan as _plan
from .rebuild import (build_member, channel_selection, check_member, inherit_member, init_member, reference_stats,
                      resolve_attributes)
from .trace import input_shape_for, meta_copy, trace

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


def plan_split(model: nn.Module, split_factor: int, *, img_size: ImgSize = None, in_chans: Optional[int] = None,
               scale_regularization: bool = True, params_tol: float = 0.02, macs_tol: float = 0.04) -> SplitPlan:
    """Trace, analyse and plan a split, without building members (cheap: works on a meta copy).

    Args:
        model: any timm model or traceable ``nn.Module``; it is not modified.
        split_factor: S, the number of members.
        img_size: the input size to plan at; default the model's ``pretrained_cfg['input_size']``.
        in_chans: input channels, for a model built with another ``in_chans`` than its cfg says.
        scale_regularization: divide dropout and drop-path rates by S.
        params_tol: allowed relative params deviation of the ensemble from the original.
        macs_tol: allowed relative MACs deviation.

    Returns:
        The :class:`~timm_split.plan.SplitPlan`.
    """
    check_split_args(model, split_factor, img_size=img_size, in_chans=in_chans, params_tol=params_tol,
                     macs_tol=macs_tol)
    return _plan_and_template(model, split_factor, img_size, scale_regularization, params_tol, macs_tol, in_chans)[0]


# (couple_inputs, couple_products, tie ambiguous attributes' groups, couple_partial, what the attempt adds),
# tried in order
_ATTEMPTS = ((False, False, False, False, "nothing"), (True, False, False, False, "input-shape couplings"),
             (True, True, False, False, "C // heads couplings"),
             (True, True, True, False, "the groups of ambiguous attributes tied"),
             (True, False, False, True, "input-shape couplings of sizes with a fixed factor"))


def _plan_and_template(model, split_factor, img_size, scale_regularization, params_tol, macs_tol, in_chans=None):
    """Plan, and check a meta member. A member that does not run is re-planned with the sizes each module
    reads from its input shape tied to its input (``analyse(couple_inputs=True)``), then also with the
    ``C // heads`` products tied (``couple_products=True``), then with the groups behind each ambiguous width
    attribute made one (``attribute_ties``), and last with sizes that have a fixed factor tied to the input
    too (``couple_partial=True``)."""
    S = _check_factor(split_factor)
    shape = input_shape_for(model, img_size, in_chans=in_chans)
    tr = trace(meta_copy(model), shape)
    out = [n for n in tr.graph.nodes if n.op == "output"][0].args[0]
    out_shape = tuple((out[0] if isinstance(out, tuple) else out).meta["val"].shape)
    headless = getattr(model, "num_classes", None) == 0  # its output is features: their width may change
    error: Optional[SplitError] = None
    ambiguous: tuple = ()
    for i, (couple, products, tie, partial, _) in enumerate(_ATTEMPTS):
        cg = analyse(tr, couple_inputs=couple, free_output=headless, couple_products=products,
                     couple_partial=partial)
        if tie and not attribute_ties(cg, ambiguous):
            continue  # no groups to tie: nothing new to try here
        p = _plan(cg, S, arch=_arch(model), params_tol=params_tol, macs_tol=macs_tol,
                  scale_regularization=scale_regularization)
        member = build_member(tr.model, p, torch.device("meta"), {}, tr.aliases)
        ambiguous = p.ambiguous
        if p.ambiguous:
            p = resolve_attributes(member, p)
        try:
            check_member(member, shape, out_shape, headless)
            return p, tr, out_shape, shape, cg
        except SplitError as e:
            error = e
            if i + 1 < len(_ATTEMPTS):
                _logger.info("%s: the member does not run (%s); re-planning with %s", p.arch, e.__cause__ or e,
                             _ATTEMPTS[i + 1][-1])
    raise error


def _pretrained_cfg(model: nn.Module, plan: SplitPlan) -> dict:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.setdefault("input_size", tuple(plan.input_size))
    arch = cfg.get("architecture") or plan.arch
    cfg.update(architecture=f"splitnet_{arch}", split_factor=plan.split_factor, base_architecture=arch)
    for k in ("hf_hub_id", "url", "file", "tag"):
        cfg.pop(k, None)
    return cfg


def split(model: nn.Module, split_factor: int, *, seed: int = 0, img_size: ImgSize = None,
          in_chans: Optional[int] = None, scale_regularization: bool = True, averaging: str = "logits",
          init: str = "random", params_tol: float = 0.02, macs_tol: float = 0.04) -> SplitEnsemble:
    """Divide ``model`` into ``split_factor`` thinner members that together cost what it does.

    Args:
        model: any timm model or traceable ``nn.Module`` (CPU, GPU or ``meta``). It is never modified.
        split_factor: S, an int >= 1. S=1 returns a one-member ensemble equal to a copy of the model.
        seed: members get seeds ``seed, seed+1, ...`` for their init (the global RNG is left untouched).
        img_size: the input size to plan at; default the model's ``pretrained_cfg['input_size']``.
        in_chans: input channels, for a model built with another ``in_chans`` than its cfg says.
        scale_regularization: divide dropout and drop-path rates by S (SplitNet's rule).
        averaging: ``'logits'`` (mean of logits) or ``'probs'`` (log of mean probabilities).
        init: ``'random'`` (each member from scratch, the family's init) or ``'inherit'`` (warm start: member
            ``i`` takes its own channel subset of ``model``'s trained weights).
        params_tol: allowed relative deviation of the ensemble's params from the original's.
        macs_tol: allowed relative deviation of the ensemble's MACs.

    Returns:
        A :class:`~timm_split.ensemble.SplitEnsemble` on the model's device; a meta model gives a meta
        ensemble (no memory, no compute).

    Raises:
        ValueError: ``split_factor`` is not an int >= 1, or so large a channel group would vanish.
        SplitError: the model has a construct the engine cannot handle (the message names the node).
    """
    check_split_args(model, split_factor, img_size=img_size, in_chans=in_chans, seed=seed, params_tol=params_tol,
                     macs_tol=macs_tol)
    S = _check_factor(split_factor)
    if init not in ("random", "inherit"):
        raise ValueError(f"init must be 'random' or 'inherit', got {init!r}")
    if S == 1:
        member = copy.deepcopy(model)
        p = plan_split(model, 1, img_size=img_size, in_chans=in_chans, scale_regularization=False)
        return SplitEnsemble([member], p, _pretrained_cfg(model, p), averaging)
    p, tr, out_shape, in_shape, cg = _plan_and_template(model, S, img_size, scale_regularization, params_tol,
                                                        macs_tol, in_chans)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    dtypes = {n: t.dtype for n, t in tensors.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    members = []
    stats = reference_stats(model) if device.type != "meta" and init == "random" else {}
    for i in range(S):
        m = build_member(tr.model, p, device, dtypes, tr.aliases)
        if device.type != "meta" and init == "inherit":
            inherit_member(m, model, channel_selection(cg, p, i, seed))
        elif device.type != "meta":
            init_member(m, stats, seed + i)
        m.train(model.training)
        members.append(m)
    _logger.info("split %s into %d members: params ratio %.4f, MACs ratio %.4f", p.arch, S, p.params_ratio,
                 p.macs_ratio)
    return SplitEnsemble(members, p, _pretrained_cfg(model, p), averaging)
