"""Stage 3, plan: choose every channel group's new width, calibrated for params and MACs parity.

Each free atom class found by the analysis is one *channel group*. Its new width is a multiple of its
divisor. Params and MACs are sums of products of atom widths (every parameter's numel, every conv / matmul /
attention op's MACs), so the ensemble cost of any width assignment is cheap to evaluate exactly. The planner
starts from ``width / sqrt(S)``, searches one global factor, then moves single groups one divisor step at a
time until the S members together are within the tolerances of the original (params ±2%, MACs ±4% by
default), preferring the assignment closest to a uniform ``1/sqrt(S)`` shrink.

Module attributes that hold a width (``in_channels``, ``num_features``, ``head_dim``, ``normalized_shape``,
``scale`` ...) are found generically: an attribute is rewritten when its value equals the old width of a
channel group local to its module (its own parameters, or ops run by it or by its direct children), and that
width maps to a single new width. No attribute names are keyed by model.
"""
from __future__ import annotations

import logging
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .analyse import _EQUAL_SPLITS, ChannelGraph, Dim

_logger = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "SplitPlan", "plan", "width_divisor", "width_attributes", "regularization_updates"]


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
    """Everything the rebuild needs, and the costs it achieves. ``print(plan)`` gives a readable table.

    Attributes:
        arch: the base architecture name.
        split_factor: S, the number of members.
        width_factor: the starting factor ``1/sqrt(S)``.
        groups: the channel groups, old and new widths.
        param_shapes: parameter/buffer name -> shape in each member.
        attributes: (module path, attribute, old value, new value) to set in each member.
        ambiguous: (module path, attribute, old value, candidate new values) where the old width matches
            several channel groups; the rebuild picks the candidate under which the module alone gives
            ``module_io``'s output shapes.
        module_io: module path -> (planned input args, planned output shapes, planned keyword args) for
            modules in ``ambiguous``.
        regularization: (module path, attribute, old value, new value) for dropout / drop-path rates.
        params: (original, ensemble total).
        macs: (original, ensemble total), MAC ops only, from the traced graph at ``input_size``.
        input_size: (C, H, W) the plan was made at.
        fixed: why some dims could not scale, with counts.
        unknown_ops: ops that had no channel rule.
    """

    arch: str
    split_factor: int
    width_factor: float
    groups: Tuple[ChannelGroup, ...]
    param_shapes: Dict[str, Tuple[int, ...]] = field(repr=False)
    attributes: Tuple[Tuple[str, str, object, object], ...] = field(repr=False)
    regularization: Tuple[Tuple[str, str, float, float], ...] = field(repr=False, default=())
    ambiguous: Tuple[Tuple[str, str, object, tuple], ...] = field(repr=False, default=())
    module_io: Dict[str, tuple] = field(repr=False, default_factory=dict)
    params: Tuple[int, int] = (0, 0)
    macs: Tuple[float, float] = (0.0, 0.0)
    input_size: Tuple[int, ...] = (3, 224, 224)
    fixed: Tuple[Tuple[str, int], ...] = field(repr=False, default=())
    unknown_ops: Tuple[Tuple[str, int], ...] = field(repr=False, default=())
    widths: Dict[int, int] = field(repr=False, compare=False, default_factory=dict)  # group atom -> new width

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
            f"  GMACs @ {self.input_size}: {self.macs[0] / 1e9:.4f} -> {S} x {self.macs[1] / S / 1e9:.4f} = "
            f"{self.macs[1] / 1e9:.4f}  (ratio {self.macs_ratio:.4f})",
            f"  channel groups: {len(self.groups)}",
            f"  {'group (first use)':<48} {'old':>6} {'new':>6} {'ratio':>6} {'div':>4} {'uses':>5}",
        ]
        for g in self.groups:
            lines.append(f"  {g.name[:48]:<48} {g.old:>6} {g.new:>6} {g.new / g.old:>6.3f} {g.divisor:>4} {g.uses:>5}")
        if self.regularization:
            seen: Dict[Tuple[str, float, float], int] = {}
            for _, attr, old, new in self.regularization:
                seen[(attr, old, new)] = seen.get((attr, old, new), 0) + 1
            regs = ", ".join(f"{a} {o:g}->{n:g} (x{c})" for (a, o, n), c in seen.items())
            lines.append(f"  regularization p/S: {regs}")
        if self.fixed:
            lines.append("  kept fixed: " + ", ".join(f"{w} ({c})" for w, c in self.fixed[:6]))
        if self.unknown_ops:
            lines.append("  ops without a rule (kept fixed): " + ", ".join(f"{o} ({c})" for o, c in self.unknown_ops))
        return "\n".join(lines)


# factors tried for two families at once: a coarse pass (0.2x to 5x of where each family is, capped at 1.5x
# the original width), then a fine one around the result
_PAIR_GRIDS = (np.exp(np.linspace(-1.6, 1.6, 33)), np.exp(np.linspace(-0.3, 0.3, 31)))
_TRIO_GRID = np.exp(np.linspace(-1.6, 1.6, 17))  # three families at once, from the uniform shrink


def width_divisor(old: int, target: float, cap: int = 8) -> int:
    """The divisor for a group: the largest power of two dividing ``old`` (at most ``cap``) that fits ``target``."""
    d = 1
    while d < cap and old % (2 * d) == 0:
        d *= 2
    while d > 1 and target < d:
        d //= 2
    return d


class _Cost:
    """Costs as polynomials in the group widths: every term is expanded into monomials (sums distributed).

    A cost is ``sum_k coef[k] * prod(x[idx[k, :]])`` where ``x`` are the variables plus a trailing 1.
    """

    def __init__(self, cg: ChannelGraph, variables: List[int]):
        self.A = cg.atoms
        self.var_index = {v: i for i, v in enumerate(variables)}
        self.one = len(variables)
        self._memo: Dict[int, List[Tuple[float, Tuple[int, ...]]]] = {}

    def _leaf(self, r: int) -> List[Tuple[float, Tuple[int, ...]]]:
        A = self.A
        r = A.find(r)
        if r in self._memo:
            return self._memo[r]
        if r in self.var_index:
            out = [(1.0, (self.var_index[r],))]
        elif r in A.sum and not A.fixed[r]:
            out = [m for d in A.sum[r] for m in self.expand(d)]
        else:
            out = [(float(A.size[r]), ())]
        self._memo[r] = out
        return out

    def expand(self, atoms: Sequence[int]) -> List[Tuple[float, Tuple[int, ...]]]:
        res: List[Tuple[float, Tuple[int, ...]]] = [(1.0, ())]
        for leaf in self.A.leaves(tuple(atoms)):
            res = [(c1 * c2, v1 + v2) for c1, v1 in res for c2, v2 in self._leaf(leaf)]
        return res

    def compile(self, terms: List[Tuple[Sequence[int], float]]) -> Tuple[np.ndarray, np.ndarray]:
        monos = [(c * w, v) for atoms, w in terms for c, v in self.expand(atoms)]
        width = max((len(v) for _, v in monos), default=1)
        idx = np.full((len(monos), max(width, 1)), self.one, dtype=np.int64)
        coef = np.zeros(len(monos))
        for i, (c, v) in enumerate(monos):
            idx[i, :len(v)] = v
            coef[i] = c
        return idx, coef

    def sizes(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([x.astype(np.float64), [1.0]])


def plan(cg: ChannelGraph, split_factor: int, *, arch: str = "", params_tol: float = 0.02,
         macs_tol: float = 0.04, max_steps: int = 400, scale_regularization: bool = True) -> SplitPlan:
    """Choose the new width of every channel group.

    Args:
        cg: the analysis of the model.
        split_factor: S >= 1.
        arch: the architecture name, for display.
        params_tol: allowed relative deviation of the ensemble's params from the original's.
        macs_tol: allowed relative deviation of the ensemble's MACs.
        max_steps: cap on single-group calibration steps.
        scale_regularization: divide dropout and drop-path rates by S.

    Returns:
        The frozen :class:`SplitPlan`.

    Raises:
        ValueError: S is so large that a channel group would shrink to nothing.
    """
    A = cg.atoms
    S = split_factor
    f0 = 1.0 / math.sqrt(S)

    # parameter terms (one per distinct tensor) and MAC terms
    roots_used: Dict[int, List[str]] = {}
    for name, dims in cg.param_dims.items():
        for k, d in enumerate(dims):
            for r in A.leaves(d):
                if not A.fixed[r] and r not in A.sum:
                    roots_used.setdefault(r, []).append(f"{name}[{k}]")
    for _, dims, _ in cg.mac_terms:
        for d in dims:
            for r in A.leaves(d):
                if not A.fixed[r] and r not in A.sum:
                    roots_used.setdefault(r, [])
    # summands of sums are variables too
    changed = True
    while changed:
        changed = False
        for r in list(A.sum):
            rr = A.find(r)
            if A.fixed[rr]:
                continue
            for d in A.sum[r]:
                for x in A.leaves(d):
                    if not A.fixed[x] and x not in A.sum and x not in roots_used:
                        roots_used[x] = []
                        changed = True
    variables = sorted(roots_used)
    old = np.array([A.size[v] for v in variables], dtype=np.float64)
    for v, o in zip(variables, old):
        if o * f0 < 0.5:
            uses = roots_used[v]
            raise ValueError(
                f"split_factor={S} is too large: channel group '{uses[0] if uses else v}' of width {int(o)} "
                f"would shrink to {o * f0:.2f} channels. Use split_factor <= {int(o * o)}."
            )

    cost = _Cost(cg, variables)
    pterms = [(tuple(a for d in dims for a in d), 1.0) for name, dims in cg.param_dims.items()
              if name not in cg.trace.buffers]
    mterms = [(tuple(a for d in dims for a in d), c) for _, dims, c in cg.mac_terms if c]
    p_idx, p_w = cost.compile(pterms)
    m_idx, m_w = cost.compile(mterms)

    def totals(x: np.ndarray) -> Tuple[float, float]:
        s = cost.sizes(x)
        return float(np.prod(s[p_idx], axis=1) @ p_w), float(np.prod(s[m_idx], axis=1) @ m_w)

    P0, M0 = totals(old)
    nv = len(variables)
    Ep = np.stack([(p_idx == i).sum(1) for i in range(nv)], 1) if nv else np.zeros((len(p_idx), 0))
    Em = np.stack([(m_idx == i).sum(1) for i in range(nv)], 1) if nv else np.zeros((len(m_idx), 0))
    target_log = np.log(np.maximum(old * f0, 1.0))

    def objective(pr, mr, distortion):
        # smooth in both ratios (a max() has ridges that single-group steps cannot cross), plus a small pull
        # towards the uniform 1/sqrt(S) shrink
        return ((pr - 1) / params_tol) ** 2 + (((mr - 1) / macs_tol) ** 2 if M0 > 0 else 0.0) + 0.1 * distortion

    def score(x: np.ndarray) -> Tuple[float, float, float]:
        P, M = totals(x)
        pr, mr = S * P / max(P0, 1.0), S * M / max(M0, 1.0)
        distortion = float(np.mean(np.abs(np.log(np.maximum(x, 1.0)) - target_log))) if len(x) else 0.0
        return objective(pr, mr, distortion), pr, mr

    def inside(sc, margin: float) -> bool:
        return abs(sc[1] - 1) <= params_tol * margin and abs(sc[2] - 1) <= macs_tol * margin

    def steps(x: np.ndarray, best, div: np.ndarray):
        for _ in range(max_steps):  # single-group steps, every candidate scored at once
            if inside(best, 1 / 3):
                break
            sz = cost.sizes(x)
            vp, vm = np.prod(sz[p_idx], axis=1) * p_w, np.prod(sz[m_idx], axis=1) * m_w
            dist0 = np.abs(np.log(np.maximum(x, 1.0)) - target_log)
            cand = None
            for sign in (1.0, -1.0):
                y = x + sign * div
                ok = (y >= div) & (y <= old * 1.5)
                rho = y / x
                pr = S * (vp @ (rho[None, :] ** Ep)) / max(P0, 1.0)
                mr = S * (vm @ (rho[None, :] ** Em)) / max(M0, 1.0) if M0 > 0 else np.ones_like(rho)
                dist = (dist0.sum() - dist0 + np.abs(np.log(np.maximum(y, 1.0)) - target_log)) / len(x)
                sc = np.where(ok, objective(pr, mr, dist), np.inf)
                i = int(np.argmin(sc))
                if sc[i] < best[0] - 1e-9 and (cand is None or sc[i] < cand[1][0]):
                    z = x.copy()
                    z[i] = y[i]
                    cand = (z, (float(sc[i]), float(pr[i]), float(mr[i])))
            if cand is None:
                break
            x, best = cand
        return x, best

    def snap(y: np.ndarray, div: np.ndarray) -> np.ndarray:  # to the nearest multiple of each divisor, >= 1 of it
        return np.maximum(np.round(y / div), 1.0) * div

    def pairs(x: np.ndarray, best, div: np.ndarray):
        # Two families of groups at once (a family: the groups of one old width, e.g. every block's MLP hidden
        # width) on a grid of factors. Where attention's N^2 x width MACs grow with a width that params also
        # depend on, parity needs two families to move apart (the attention width down, the MLP hidden width
        # up, at most 1.5x the original), which neither one global factor nor single-group steps reach.
        fams = sorted((np.flatnonzero(old == w) for w in np.unique(old)), key=lambda f: -old[f].sum())[:5]
        top = np.maximum(np.floor(old * 1.5 / div) * div, div)
        for a, b, grid in ((a, b, g) for g in _PAIR_GRIDS for a, b in itertools.combinations(fams, 2)):
            x0 = x
            for fa, fb in itertools.product(grid, grid):
                y = x0.copy()
                y[a] = snap(x0[a] * fa, div[a])
                y[b] = snap(x0[b] * fb, div[b])
                sc = score(np.minimum(y, top))
                if sc[0] < best[0] - 1e-9:
                    x, best = np.minimum(y, top), sc
        # three families where two are not enough (gMixer: the embedding up, the token MLP at 1/2, the channel MLP
        # at 1/5, where token-mixing weights do not shrink with the width), from the uniform shrink: the best
        # point so far can sit where no family move leads out
        uniform = snap(old * f0, div)
        for trio in itertools.combinations(fams[:4], 3) if not inside(best, 1.0) else ():
            for fs in itertools.product(_TRIO_GRID, _TRIO_GRID, _TRIO_GRID):
                y = uniform.copy()
                for fam, fa in zip(trio, fs):
                    y[fam] = snap(uniform[fam] * fa, div[fam])
                sc = score(np.minimum(y, top))
                if sc[0] < best[0] - 1e-9:
                    x, best = np.minimum(y, top), sc
        return x, best

    def calibrate(div: np.ndarray):
        x = snap(old * f0, div)
        best = score(x)
        if S == 1 or not len(variables):
            return x, best
        for f in f0 * np.exp(np.linspace(-0.25, 0.25, 51)):  # one global factor
            y = snap(old * f, div)
            sc = score(y)
            if sc[0] < best[0]:
                x, best = y, sc
        return steps(x, best, div)

    # divisors: powers of two up to 8; finer only where coarse steps cannot reach parity with margin
    found = None
    for cap in (8, 4, 2, 1):
        div_c = np.array([width_divisor(int(o), o * f0, cap) for o in old], dtype=np.float64)
        x_c, best_c = calibrate(div_c)
        if found is None or (inside(best_c, 1.0), -best_c[0]) > (inside(found[1], 1.0), -found[1][0]):
            found = (x_c, best_c, div_c)
        if inside(best_c, 0.5):
            break
    if S > 1 and not inside(found[1], 1.0):  # the fallback, for attention-heavy models
        x_c, _, div_c = found
        found = (*steps(*pairs(x_c, found[1], div_c), div_c), div_c)
    x, best, div = found
    _, pr, mr = best
    if S > 1 and (abs(pr - 1) > params_tol or abs(mr - 1) > macs_tol):
        _logger.warning(
            "%s: split into %d members reaches params ratio %.3f and MACs ratio %.3f, outside ±%.0f%%/±%.0f%%: "
            "%d of %d tensor dims are fixed (%s)", arch or "model", S, pr, mr, params_tol * 100, macs_tol * 100,
            _count_fixed(cg), sum(len(d) for d in cg.param_dims.values()), _top_reasons(cg, 3))

    new_of = {v: int(n) for v, n in zip(variables, x)}
    P1, M1 = totals(x)
    groups = tuple(
        ChannelGroup(name=(roots_used[v][0] if roots_used[v] else f"activation#{v}"), old=int(A.size[v]),
                     new=new_of[v], divisor=int(d), uses=len(roots_used[v]))
        for v, d in zip(variables, div)
    )
    sizes = _SizeOf(cg, new_of, f0)
    shapes = {name: tuple(sizes.dim(d) for d in dims) for name, dims in cg.param_dims.items()}
    regs = regularization_updates(cg.trace.model, S) if scale_regularization and S > 1 else ()
    attrs, ambiguous = width_attributes(cg, sizes)
    io = {}
    for path in {a[0] for a in ambiguous}:
        args, outs, kwargs = cg.trace.calls.get(path, ([], [], {}))
        shape = lambda n: tuple(sizes.dim(d) for d in n.meta["split_dims"])  # noqa: E731
        spec = lambda a: (  # noqa: E731
            ("tensor", shape(a), a.meta["val"].dtype) if isinstance(a, torch.fx.Node) else ("value", a))
        io[path] = ([spec(a) for a in args], [shape(o) for o in outs if o is not None],
                    {k: spec(a) for k, a in kwargs.items()})
    return SplitPlan(
        arch=arch, split_factor=S, width_factor=f0, groups=groups, param_shapes=shapes,
        attributes=attrs, ambiguous=ambiguous, module_io=io, regularization=regs,
        params=(int(P0), int(round(S * P1))), macs=(M0, S * M1),
        input_size=tuple(cg.trace.input_node.meta["val"].shape[1:]),
        fixed=_top_reasons_list(cg), unknown_ops=tuple(sorted(cg.unknown_ops.items())), widths=new_of,
    )


class _SizeOf:
    """New width of any atom / dim under a plan (free atoms outside the cost terms shrink by 1/sqrt(S))."""

    def __init__(self, cg: ChannelGraph, new_of: Dict[int, int], f0: float):
        self.A, self.new_of, self.f0 = cg.atoms, new_of, f0
        self.memo: Dict[int, int] = {}

    def atom(self, a: int) -> int:
        A = self.A
        r = A.find(a)
        if r in self.memo:
            return self.memo[r]
        if A.fixed[r]:
            v = A.size[r]
        elif r in A.prod:
            v = math.prod(self.atom(k) for k in A.prod[r])
        elif r in A.sum:
            v = sum(self.dim(d) for d in A.sum[r])
        elif r in self.new_of:
            v = self.new_of[r]
        else:
            v = max(1, int(round(A.size[r] * self.f0)))
        self.memo[r] = v
        return v

    def dim(self, d: Dim) -> int:
        return math.prod(self.atom(a) for a in d)


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


_DROP_ATTRS = ("drop_rate", "drop_path_rate", "drop_prob", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
               "path_drop_rate", "drop_block_rate")
_SKIP_ATTRS = {"training", "inplace"}


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _scopes(cg: ChannelGraph) -> Tuple[Dict[str, List], Dict[str, List]]:
    """The dims each module sees: its parameters and buffers, what it is called with, and what the ops in it
    (or in its children) produce; and separately the dims of its own parameters and buffers."""
    scopes: Dict[str, List] = {}
    own: Dict[str, List] = {}
    for name, dims in cg.param_dims.items():
        scopes.setdefault(_parent(name), []).extend(dims)
        own.setdefault(_parent(name), []).extend(dims)
    for path, (args, _, kwargs) in cg.trace.calls.items():  # what a module is called with belongs to its scope
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                scopes.setdefault(path, []).extend(a.meta.get("split_dims") or [])
    for node in cg.trace.graph.nodes:
        st = node.meta.get("nn_module_stack") or []
        if node.op == "output":  # what the model returns belongs to the model's scope
            scopes.setdefault("", []).extend(d for a in node.all_input_nodes for d in a.meta.get("split_dims") or [])
        if not st or node.op != "call_function":
            continue
        dims = node.meta.get("split_dims") or []
        flat = dims if isinstance(node.meta.get("val"), torch.Tensor) else [d for o in dims for d in o]
        if node.target in _EQUAL_SPLITS:  # ``x.split(self.expand_chs // 2)``: the whole being split is in scope too
            flat = list(flat) + list(node.args[0].meta.get("split_dims") or [])
        for path in {st[-1], _parent(st[-1])} | ({st[-2]} if len(st) > 1 else set()):
            scopes.setdefault(path, []).extend(flat)
    return scopes, own


def attribute_ties(cg: ChannelGraph, ambiguous: Sequence[Tuple[str, str, object, tuple]]) -> int:
    """Make the channel groups behind each ambiguous attribute one group, in place (``cg.atoms``).

    A module that keeps one width in one attribute (``val_dim`` of every head of a cascaded attention) needs
    the groups of that old width in its scope to stay equal; the first plan does not know that.

    Returns:
        How many groups were merged away.
    """
    A, scopes, merged = cg.atoms, _scopes(cg)[0], 0
    for path, _, old, _ in ambiguous:
        roots = {A.find(d[0]) for d in scopes.get(path, ()) if len(d) == 1 and A.size[d[0]] == old}
        roots = sorted(r for r in roots if not A.fixed[r] and r not in A.prod and r not in A.sum)
        for r in roots[1:]:
            A.union(roots[0], r)
            merged += 1
    return merged


def width_attributes(cg: ChannelGraph, sizes: _SizeOf):
    """Find the module attributes that hold channel widths, and their new values.

    Args:
        cg: the analysis.
        sizes: new width of every atom under the plan.

    Returns:
        ((module path, attribute, old value, new value) for every attribute that changes,
         (module path, attribute, old value, candidates) where the old value maps to several widths).
    """
    A = cg.atoms
    model = cg.trace.model
    scopes, own_dims = _scopes(cg)

    def table(dims_of: Dict[str, List]) -> Dict[str, Dict[int, set]]:
        out: Dict[str, Dict[int, set]] = {}
        for path, dims in dims_of.items():
            m = out.setdefault(path, {})
            for dim in dims:
                m.setdefault(A.dim_size(dim), set()).add(sizes.dim(dim))
                for r in A.leaves(dim):
                    m.setdefault(A.size[r], set()).add(sizes.atom(r))
        return out

    local, own = table(scopes), table(own_dims)  # own: widths of a module's own parameters and buffers

    sections: Dict[str, Dict[tuple, set]] = {}  # split sizes a module passes to split_with_sizes
    for node in cg.trace.graph.nodes:
        st = node.meta.get("nn_module_stack") or []
        if node.target is not torch.ops.aten.split_with_sizes.default or not st:
            continue
        old = tuple(node.args[1])
        rank = len(node.args[0].meta["val"].shape)
        d = (node.args[2] if len(node.args) > 2 else 0) % rank
        new = tuple(sizes.dim(piece[d]) for piece in node.meta["split_dims"])
        for path in {st[-1], _parent(st[-1])} | ({st[-2]} if len(st) > 1 else set()):
            sections.setdefault(path, {}).setdefault(old, set()).add(new)

    out: List[Tuple[str, str, object, object]] = []
    ambiguous: List[Tuple[str, str, object, tuple]] = []
    conv_groups = {}
    for node in cg.trace.graph.nodes:
        g = cg.groups_atoms.get(node.name)
        st = node.meta.get("nn_module_stack") or []
        if g is not None and st:
            conv_groups[st[-1]] = sizes.atom(g)
    for path, mod in model.named_modules(remove_duplicate=False):
        exact = _layer_attributes(path, mod, conv_groups.get(path), sizes, cg)
        out.extend(exact or ())
        m = local.get(path)
        if not m:
            continue
        mapping = {o: next(iter(n)) for o, n in m.items() if len(n) == 1}
        skip = _EXACT_ATTRS.get(type(mod), ()) if exact is not None else ()
        for attr, v in list(vars(mod).items()):
            if attr.startswith("_") or attr in _SKIP_ATTRS or attr in skip:
                continue
            if type(v) is int and v > 1:
                # a size passed to split_with_sizes in this module names its piece: a candidate where the
                # old width is ambiguous, the value where the module's tensors do not show it at all
                piece = {n[i] for o, ns in sections.get(path, {}).items() for n in ns
                         for i, e in enumerate(o) if e == v}
                cands = m.get(v, set()) | piece if len(m.get(v, ())) > 1 or v not in m else set()
                if len(cands) > 1:
                    ambiguous.append((path, attr, v, tuple(sorted(cands | {v}))))
                    continue
                if cands and cands != {v}:
                    out.append((path, attr, v, cands.pop()))
                    continue
            ints = isinstance(v, (tuple, list)) and all(type(e) is int for e in v)
            cut = sections.get(path, {}).get(tuple(v), ()) if ints else ()
            if ints and not cut and v and any(e > 1 and len(m.get(e, ())) > 1 for e in v):
                # a shape tuple with an ambiguous width (RmsNorm's normalized_shape where 1,024 is both the
                # width and the token count): try each combination
                opts = [sorted(m[e] | {e}) if e > 1 and len(m.get(e, ())) > 1 else [mapping.get(e, e)] for e in v]
                combos = tuple(type(v)(c) for c in itertools.islice(itertools.product(*opts), 16))
                ambiguous.append((path, attr, v, combos))
                continue
            nv = type(v)(next(iter(cut))) if len(cut) == 1 else _map_value(attr, v, mapping)
            if nv is None and isinstance(v, int) and v not in m:
                nv = _multiple_of_own(v, own.get(path, {}))
            if nv is not None and nv != v and ints and not cut and path in cg.trace.calls:
                # a tuple of sizes matched by value may be geometry (a window of 16 x 16 beside 16 heads): the
                # module is run with both to see which gives the planned shapes
                ambiguous.append((path, attr, v, (nv, v)))
            elif nv is not None and nv != v:
                out.append((path, attr, v, nv))
    return tuple(out), tuple(ambiguous)


def _multiple_of_own(v: int, own: Dict[int, set]) -> Optional[int]:
    """A size a module keeps as a small multiple of one of its own tensors' widths (rotary embeddings keep
    ``dim`` and a ``periods`` buffer of ``dim // 4``): scaled with that width where exactly one width fits."""
    if isinstance(v, bool) or v < 16:
        return None
    fits = {k * next(iter(n)) for o, n in own.items() for k in (2, 4) if o >= 8 and v == k * o and len(n) == 1}
    return fits.pop() if len(fits) == 1 else None


_CONV_ATTRS = ("in_channels", "out_channels", "groups")
_EXACT_ATTRS = {}  # filled lazily: type -> attributes that _layer_attributes sets exactly


def _layer_attributes(path: str, mod: nn.Module, groups: Optional[int], sizes: "_SizeOf", cg: ChannelGraph):
    """Width attributes of torch's own layers, computed from their new parameter shapes (not matched)."""
    def shape(leaf):
        dims = cg.param_dims.get(f"{path}.{leaf}" if path else leaf)
        return None if dims is None else tuple(sizes.dim(d) for d in dims)

    new = {}
    if isinstance(mod, nn.modules.conv._ConvNd) and shape("weight"):
        w = shape("weight")
        g = groups if groups is not None else mod.groups
        new = dict(groups=g, in_channels=w[0] if mod.transposed else w[1] * g,
                   out_channels=w[1] * g if mod.transposed else w[0])
    elif isinstance(mod, nn.Linear) and shape("weight"):
        w = shape("weight")
        new = dict(in_features=w[1], out_features=w[0])
    elif isinstance(mod, nn.modules.batchnorm._NormBase) and (shape("weight") or shape("running_mean")):
        new = dict(num_features=(shape("weight") or shape("running_mean"))[0])
    elif isinstance(mod, nn.LayerNorm) and shape("weight"):
        new = dict(normalized_shape=tuple(shape("weight")))
    elif isinstance(mod, nn.GroupNorm) and shape("weight"):  # the group count is fixed by the analysis
        new = dict(num_channels=shape("weight")[0], num_groups=mod.num_groups)
    elif isinstance(mod, nn.Embedding) and shape("weight"):
        new = dict(num_embeddings=shape("weight")[0], embedding_dim=shape("weight")[1])
    else:
        return None
    _EXACT_ATTRS[type(mod)] = tuple(new)
    return [(path, k, getattr(mod, k), v) for k, v in new.items() if getattr(mod, k) != v]


def _map_value(attr: str, v, mapping: Dict[int, int]):
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return mapping.get(v) if v > 1 else None
    if isinstance(v, float) and "scale" in attr and v > 0:
        for o, n in mapping.items():
            if o > 1 and n != o and math.isclose(v, o ** -0.5, rel_tol=1e-6):
                return n ** -0.5
        return None
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        nv = [mapping.get(e, e) if e > 1 else e for e in v]
        return type(v)(nv) if nv != list(v) else None
    return None


def regularization_updates(model: nn.Module, split_factor: int) -> Tuple[Tuple[str, str, float, float], ...]:
    """Dropout and drop-path rates divided by S: nn.Dropout ``p``, timm DropPath ``drop_prob`` and ``*drop*_rate``."""
    out = []
    for path, mod in model.named_modules():
        for attr in ("p",) if isinstance(mod, nn.modules.dropout._DropoutNd) else _DROP_ATTRS:
            v = getattr(mod, attr, None) if attr in vars(mod) else None
            if isinstance(v, float) and v > 0:
                out.append((path, attr, v, v / split_factor))
    return tuple(out)
