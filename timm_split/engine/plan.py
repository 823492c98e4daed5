"""Stage 3, plan: choose every channel group's new width, calibrated for params and MACs parity.

Each free atom class found by the analysis is one *channel group* (:func:`~timm_split.engine.search.channel_variables`).
:class:`~timm_split.engine.search.WidthSearch` picks the widths (its docstring states the objective); from them
follow every tensor's shape in a member and the width attributes of its modules
(:mod:`~timm_split.engine.attributes`). ``plan()`` returns a :class:`PlanDraft`: the frozen :class:`SplitPlan`
and what the rebuild still needs to finish it (the new width of every atom, the ambiguous attributes).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np

from .analyse import ChannelGraph
from .atoms import NewWidths
from .attributes import Ambiguous, module_io, regularization_updates, width_attributes
from .search import WidthSearch, channel_variables, deviation

_logger = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "SplitPlan", "PlanDraft", "plan"]


@dataclass(frozen=True)
class ChannelGroup:
    """One set of channel dims that change together.

    Attributes:
        name: where it is first used (a parameter dim such as ``layer1.0.conv1.weight[0]``).
        old: width in the original model.
        new: width in each member.
        divisor: the new width is a multiple of this.
        uses: how many parameter dims belong to it.
    """

    name: str
    old: int
    new: int
    divisor: int
    uses: int


@dataclass(frozen=True)
class SplitPlan:
    """The plan: every channel group's width, every tensor's shape and attribute in a member, and the costs it
    achieves. ``print(plan)`` gives a readable table. Frozen (its dicts are not copied: do not edit them).

    Attributes:
        arch: the base architecture name.
        split_factor: S, the number of members.
        width_factor: the starting factor ``1/sqrt(S)``.
        groups: the channel groups, old and new widths.
        param_shapes: parameter/buffer name -> shape in each member.
        attributes: (module path, attribute, old value, new value) to set in each member.
        regularization: (module path, attribute, old value, new value) for dropout / drop-path rates.
        params: (original, ensemble total).
        macs: (original, ensemble total) MACs per image at ``input_size``; after :func:`timm_split.split` as
            :func:`~timm_split.count.count` counts them (``Cost.gmacs``, timm's convention), the numbers
            ``timm-split compare`` prints; the planner's own cost model differs from it by fvcore's global-pool term.
        input_size: (C, H, W) the plan was made at.
        fixed: why some dims could not scale, with counts.
        unknown_ops: ops that had no channel rule.
        planned_at: ``(('num_classes', n), ('in_chans', c), ('img_size', (h, w)))`` where the widths were
            planned at the cfg's head, input and size, not the model's own (:mod:`~timm_split.engine.canonical`);
            empty where planned on the model.
        planned_params: ``params`` at that head, where ``planned_at`` is set.
    """

    arch: str
    split_factor: int
    width_factor: float
    groups: Tuple[ChannelGroup, ...]
    param_shapes: Dict[str, Tuple[int, ...]] = field(repr=False)
    attributes: Tuple[Tuple[str, str, object, object], ...] = field(repr=False)
    regularization: Tuple[Tuple[str, str, float, float], ...] = field(repr=False, default=())
    params: Tuple[int, int] = (0, 0)
    macs: Tuple[float, float] = (0.0, 0.0)
    input_size: Tuple[int, ...] = (3, 224, 224)
    fixed: Tuple[Tuple[str, int], ...] = field(repr=False, default=())
    unknown_ops: Tuple[Tuple[str, int], ...] = field(repr=False, default=())
    planned_at: Tuple[Tuple[str, object], ...] = ()
    planned_params: Tuple[int, int] = (0, 0)

    @property
    def max_deviation(self) -> float:
        """The largest distance of a group's width ratio from the uniform ``1/sqrt(S)`` shrink, beyond what
        rounding to its divisor forces (:func:`~timm_split.engine.search.deviation`; 0 = uniform)."""
        if not self.groups:
            return 0.0
        old, new, div = (np.array([getattr(g, k) for g in self.groups], dtype=np.float64)
                         for k in ("old", "new", "divisor"))
        return float(deviation(old, new, div, self.split_factor).max())

    @property
    def drop_divisor(self) -> float:
        """What the plan divided dropout and drop-path rates by (1.0 where it changed none)."""
        return next((old / new for _, _, old, new in self.regularization if new), 1.0)

    @property
    def params_ratio(self) -> float:
        """Ensemble params / original params."""
        return self.params[1] / max(self.params[0], 1)

    @property
    def macs_ratio(self) -> float:
        """Ensemble MACs / original MACs."""
        return self.macs[1] / max(self.macs[0], 1.0)

    def __str__(self) -> str:
        S = self.split_factor
        lines = [
            f"SplitPlan: {self.arch} -> {S} members, start width factor 1/sqrt({S}) = {self.width_factor:.3f}",
            f"  params: {self.params[0] / 1e6:.3f}M -> {S} x {self.params[1] / S / 1e6:.3f}M = "
            f"{self.params[1] / 1e6:.3f}M  (ratio {self.params_ratio:.4f})",
            f"  GMACs per image @ {self.input_size}: {self.macs[0] / 1e9:.4f} -> {S} x {self.macs[1] / S / 1e9:.4f} = "
            f"{self.macs[1] / 1e9:.4f}  (ratio {self.macs_ratio:.4f})",
            f"  channel groups: {len(self.groups)}; largest deviation from the uniform shrink beyond rounding "
            f"{self.max_deviation:.3f}",
            f"  {'group (first use)':<48} {'old':>6} {'new':>6} {'ratio':>6} {'div':>4} {'uses':>5}",
        ]
        for g in self.groups:
            lines.append(f"  {g.name[:48]:<48} {g.old:>6} {g.new:>6} {g.new / g.old:>6.3f} {g.divisor:>4} {g.uses:>5}")
        if self.regularization:
            seen: Dict[Tuple[str, float, float], int] = {}
            for _, attr, old, new in self.regularization:
                seen[(attr, old, new)] = seen.get((attr, old, new), 0) + 1
            regs = ", ".join(f"{a} {o:g}->{n:g} (x{c})" for (a, o, n), c in seen.items())
            lines.append(f"  dropout / drop-path rates divided by {self.drop_divisor:g}: {regs}")
        if self.planned_at:
            at = ", ".join(f"{k}={v}" for k, v in self.planned_at)
            pr = self.planned_params[1] / max(self.planned_params[0], 1)
            lines.append(f"  backbone planned at the cfg's {at}; this model's head and input move the params ratio "
                         f"{pr:.4f} -> {self.params_ratio:.4f}")
        if self.fixed:
            lines.append("  kept fixed: " + ", ".join(f"{w} ({c})" for w, c in self.fixed[:6]))
        if self.unknown_ops:
            lines.append("  ops without a rule (kept fixed): " + ", ".join(f"{o} ({c})" for o, c in self.unknown_ops))
        return "\n".join(lines)


@dataclass
class PlanDraft:
    """A plan and the working state the rebuild needs to finish it.

    Attributes:
        plan: the plan, its ambiguous attributes not yet in ``plan.attributes``.
        sizes: the new width of every atom (for ``init='inherit'``'s channel selection).
        ambiguous: (module path, attribute, old value, candidates) where the old width matches several
            channel groups; :func:`~timm_split.engine.attributes.settle_attributes` picks one.
        module_io: the planned calls of those modules (:func:`~timm_split.engine.attributes.module_io`).
    """

    plan: SplitPlan
    sizes: NewWidths
    ambiguous: Ambiguous = ()
    module_io: Dict[str, tuple] = field(default_factory=dict)


def plan(cg: ChannelGraph, split_factor: int, *, arch: str = "", params_tol: float = 0.02,
         macs_tol: float = 0.04, max_steps: int = 400, scale_regularization: bool = True,
         drop_scale: str = "S", refine: bool = True) -> PlanDraft:
    """Choose the new width of every channel group.

    Args:
        cg: the analysis of the model.
        split_factor: S >= 1.
        arch: the architecture name, for display.
        params_tol: allowed relative deviation of the ensemble's params from the original's.
        macs_tol: allowed relative deviation of the ensemble's MACs.
        max_steps: cap on single-group calibration steps.
        scale_regularization: divide dropout and drop-path rates (by S, or sqrt(S): ``drop_scale``).
        drop_scale: ``'S'`` or ``'sqrt'`` (:func:`~timm_split.engine.attributes.drop_divisor`).
        refine: end the search by moving towards the uniform shrink (:meth:`WidthSearch.refine`).

    Returns:
        The :class:`PlanDraft` (its ``plan`` is the :class:`SplitPlan`).

    Raises:
        ValueError: S is so large that a channel group would shrink to nothing.
    """
    A, S, f0 = cg.atoms, split_factor, 1.0 / math.sqrt(split_factor)
    uses = channel_variables(cg)
    variables = sorted(uses)
    _check_not_too_large(cg, uses, variables, S)
    search = WidthSearch(cg, variables, S, params_tol, macs_tol, max_steps, refine)
    x, (_, pr, mr), div = search.run()
    if S > 1 and (abs(pr - 1) > params_tol or abs(mr - 1) > macs_tol):
        _logger.warning(
            "%s: split into %d members reaches params ratio %.3f and MACs ratio %.3f, outside ±%.0f%%/±%.0f%%: "
            "%d of %d tensor dims are fixed (%s)", arch or "model", S, pr, mr, params_tol * 100, macs_tol * 100,
            _count_fixed(cg), sum(len(d) for d in cg.param_dims.values()), _top_reasons(cg, 3))
    new_of = {v: int(n) for v, n in zip(variables, x)}
    P1, M1 = search.totals(x)
    groups = tuple(ChannelGroup(name=(uses[v][0] if uses[v] else f"activation#{v}"), old=int(A.size[v]),
                                new=new_of[v], divisor=int(d), uses=len(uses[v])) for v, d in zip(variables, div))
    sizes = NewWidths(A, new_of, f0)
    attrs, ambiguous = width_attributes(cg, sizes)
    batch = cg.trace.input_node.meta["val"].shape[0]  # the trace's batch: MACs are stated per image
    p = SplitPlan(
        arch=arch, split_factor=S, width_factor=f0, groups=groups,
        param_shapes={name: tuple(sizes.dim(d) for d in dims) for name, dims in cg.param_dims.items()},
        attributes=attrs,
        regularization=regularization_updates(cg.trace.model, S, drop_scale) if scale_regularization and S > 1 else (),
        params=(int(search.P0), int(round(S * P1))), macs=(search.M0 / batch, S * M1 / batch),
        input_size=tuple(cg.trace.input_node.meta["val"].shape[1:]),
        fixed=_top_reasons_list(cg), unknown_ops=tuple(sorted(cg.unknown_ops.items())),
    )
    return PlanDraft(p, sizes, ambiguous, module_io(cg, sizes, {a[0] for a in ambiguous}))


def _check_not_too_large(cg: ChannelGraph, uses, variables, S: int) -> None:
    f0 = 1.0 / math.sqrt(S)
    old = np.array([cg.atoms.size[v] for v in variables], dtype=np.float64)
    for v, o in zip(variables, old):
        if o * f0 < 0.5:
            first = uses[v]
            raise ValueError(
                f"split_factor={S} is too large: channel group '{first[0] if first else v}' of width {int(o)} "
                f"would shrink to {o * f0:.2f} channels. Use split_factor <= {int(o * o)}."
            )


def _count_fixed(cg: ChannelGraph) -> int:
    A = cg.atoms
    return sum(1 for dims in cg.param_dims.values() for d in dims
               if all(A.fixed[r] for r in A.leaves(d)) and A.dim_size(d) > 1)


def _top_reasons_list(cg: ChannelGraph) -> Tuple[Tuple[str, int], ...]:
    A = cg.atoms
    counts: Dict[str, int] = {}
    for dims in cg.param_dims.values():
        for d in dims:
            for r in A.leaves(d):
                if A.fixed[r] and A.size[r] > 1:
                    w = A.why.get(r, "fixed")
                    counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(counts.items(), key=lambda kv: -kv[1]))


def _top_reasons(cg: ChannelGraph, k: int) -> str:
    return ", ".join(f"{w}: {c}" for w, c in _top_reasons_list(cg)[:k])
