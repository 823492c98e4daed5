"""The cost model and the width search of the planner.

Params and MACs are sums of products of group widths (every parameter's numel, every conv / matmul / attention
op's MACs, fvcore's norm and upsampling terms). :class:`CostModel` expands them into monomials once, so the
ensemble's cost of any width assignment is a few numpy ops.

The objective :class:`WidthSearch` minimises, over the new width ``x_g`` of every channel group ``g`` (a
multiple of its divisor, at most ``MAX_GROWTH`` times its old width), is::

    ((P(x) - 1) / params_tol)^2 + ((M(x) - 1) / macs_tol)^2
        + DISTORTION_WEIGHT * mean_g |log(x_g) - log(old_g / sqrt(S))|

where ``P`` and ``M`` are the S members' params and MACs over the original's. The smooth sum matters: a
``max()`` has ridges that single-group steps cannot cross (vit_small S=4 stuck at MACs 1.041). The distortion
term prefers the assignment closest to a uniform ``1/sqrt(S)`` shrink.

The search, in order: start at ``old / sqrt(S)`` snapped to each group's divisor; one global factor; single-group
steps (every candidate scored at once) until inside a third of the tolerances; coarser divisors first, finer
only where the coarse ones miss. Where that still misses parity, families of groups (the groups of one old
width) move two at a time on a grid, then three from the uniform shrink, then single steps again.

Last, among the plans inside the tolerances (at most ``REFINE_MARGIN`` of them, or the found plan's own margin
where it is wider), :meth:`WidthSearch.refine` moves to the one closest to a uniform shrink: the smallest
largest :func:`deviation` of any group (``|new/old - 1/sqrt(S)|`` beyond what rounding to its divisor forces),
then the smallest sum of them.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .analyse import ChannelGraph

__all__ = ["CostModel", "WidthSearch", "channel_variables", "width_divisor", "deviation"]

# the weight of the distortion (distance from the uniform 1/sqrt(S) shrink) in the objective
DISTORTION_WEIGHT = 0.1
# a group grows to at most this multiple of its original width (an MLP hidden width making up for attention)
MAX_GROWTH = 1.5
# the one global factor tried first: f0 * exp(t) for GLOBAL_STEPS values of t in [-GLOBAL_SPAN, GLOBAL_SPAN]
GLOBAL_SPAN, GLOBAL_STEPS = 0.25, 51
# divisor caps tried in turn (powers of two up to 8; finer only where coarse steps cannot reach parity)
DIVISOR_CAPS = (8, 4, 2, 1)
# margins, as fractions of the tolerances: single steps stop inside STOP_MARGIN, a divisor cap is kept once
# inside ACCEPT_MARGIN, and the family fallback runs where the result is outside the tolerances (margin 1)
STOP_MARGIN, ACCEPT_MARGIN = 1 / 3, 0.5
# an improvement must beat the best score by more than this
MIN_GAIN = 1e-9
# family moves: the largest families (by total old width) considered, two at a time and three at a time;
# factors for two at once: a coarse pass (0.2x to 5x of where each family is), then a fine one around the result
PAIR_FAMILIES, TRIO_FAMILIES = 5, 4
PAIR_GRIDS = (np.exp(np.linspace(-1.6, 1.6, 33)), np.exp(np.linspace(-0.3, 0.3, 31)))
TRIO_GRID = np.exp(np.linspace(-1.6, 1.6, 17))  # three families at once, from the uniform shrink
# the refinement towards the uniform shrink stays inside this fraction of the tolerances (or the found plan's)
REFINE_MARGIN = 0.5
# the other group's moves tried with it: none, then 1..4 divisor steps either way
REFINE_STEPS = (0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0)
Score = Tuple[float, float, float]  # (objective, params ratio, MACs ratio)


def width_divisor(old: int, target: float, cap: int = 8) -> int:
    """The divisor for a group: the largest power of two dividing ``old`` (at most ``cap``) that fits ``target``."""
    d = 1
    while d < cap and old % (2 * d) == 0:
        d *= 2
    while d > 1 and target < d:
        d //= 2
    return d


def deviation(old: np.ndarray, new: np.ndarray, div: np.ndarray, split_factor: int) -> np.ndarray:
    """Each group's distance from the uniform shrink beyond rounding: ``|new/old - f|`` minus the same for the
    multiple of its divisor nearest ``old * f``, with ``f = 1/sqrt(S)`` (0 = as uniform as the divisor allows)."""
    f = 1.0 / math.sqrt(split_factor)
    best = np.abs(_snap(old * f, div) / old - f)
    return np.maximum(np.abs(new / old - f) - best, 0.0)


def channel_variables(cg: ChannelGraph) -> Dict[int, List[str]]:
    """The channel groups: every free, unrefined atom class a parameter, a MAC term or a free sum touches,
    mapped to the parameter dims that use it (``'layer1.0.conv1.weight[0]'``), in first-use order."""
    A = cg.atoms
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
    changed = True  # summands of sums are variables too
    while changed:
        changed = False
        for r in list(A.sum):
            if A.fixed[A.find(r)]:
                continue
            for d in A.sum[r]:
                for x in A.leaves(d):
                    if not A.fixed[x] and x not in A.sum and x not in roots_used:
                        roots_used[x] = []
                        changed = True
    return roots_used


class CostModel:
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
        """The monomials ``(coefficient, variable indices)`` of the product of ``atoms``."""
        res: List[Tuple[float, Tuple[int, ...]]] = [(1.0, ())]
        for leaf in self.A.leaves(tuple(atoms)):
            res = [(c1 * c2, v1 + v2) for c1, v1 in res for c2, v2 in self._leaf(leaf)]
        return res

    def compile(self, terms: List[Tuple[Sequence[int], float]]) -> Tuple[np.ndarray, np.ndarray]:
        """``(idx, coef)`` arrays of a sum of weighted atom products."""
        monos = [(c * w, v) for atoms, w in terms for c, v in self.expand(atoms)]
        width = max((len(v) for _, v in monos), default=1)
        idx = np.full((len(monos), max(width, 1)), self.one, dtype=np.int64)
        coef = np.zeros(len(monos))
        for i, (c, v) in enumerate(monos):
            idx[i, :len(v)] = v
            coef[i] = c
        return idx, coef

    def sizes(self, x: np.ndarray) -> np.ndarray:
        """The variables' widths with the trailing 1 the monomials index for their constant factors."""
        return np.concatenate([x.astype(np.float64), [1.0]])


def _snap(y: np.ndarray, div: np.ndarray) -> np.ndarray:
    """To the nearest multiple of each divisor, at least one of it."""
    return np.maximum(np.round(y / div), 1.0) * div


class WidthSearch:
    """Minimise the objective of the module docstring over the widths of ``variables``.

    Args:
        cg: the analysis.
        variables: the group root atoms (sorted).
        split_factor: S.
        params_tol: allowed relative deviation of the ensemble's params.
        macs_tol: allowed relative deviation of the ensemble's MACs.
        max_steps: cap on single-group steps per pass.
        refine: end with :meth:`refine` (``plan_split(refine=False)`` gives the plan before it, for
            benchmarks/plan_shape.py's "before" column).
    """

    def __init__(self, cg: ChannelGraph, variables: List[int], split_factor: int, params_tol: float,
                 macs_tol: float, max_steps: int, refine: bool = True):
        A = cg.atoms
        self.S, self.f0 = split_factor, 1.0 / math.sqrt(split_factor)
        self.params_tol, self.macs_tol, self.max_steps, self.uniform_refine = params_tol, macs_tol, max_steps, refine
        self.nvars = len(variables)
        self.old = np.array([A.size[v] for v in variables], dtype=np.float64)
        self.cost = CostModel(cg, variables)
        pterms = [(tuple(a for d in dims for a in d), 1.0) for name, dims in cg.param_dims.items()
                  if name not in cg.trace.buffers]
        mterms = [(tuple(a for d in dims for a in d), c) for _, dims, c in cg.mac_terms if c]
        self.p_idx, self.p_w = self.cost.compile(pterms)
        self.m_idx, self.m_w = self.cost.compile(mterms)
        self.P0, self.M0 = self.totals(self.old)
        nv = self.nvars
        # exponent of each variable in each monomial
        self.Ep = np.stack([(self.p_idx == i).sum(1) for i in range(nv)], 1) if nv else np.zeros((len(self.p_idx), 0))
        self.Em = np.stack([(self.m_idx == i).sum(1) for i in range(nv)], 1) if nv else np.zeros((len(self.m_idx), 0))
        self.target_log = np.log(np.maximum(self.old * self.f0, 1.0))

    def totals(self, x: np.ndarray) -> Tuple[float, float]:
        """One member's (params, MACs) at widths ``x``."""
        s = self.cost.sizes(x)
        return float(np.prod(s[self.p_idx], axis=1) @ self.p_w), float(np.prod(s[self.m_idx], axis=1) @ self.m_w)

    def objective(self, pr, mr, distortion):
        """The objective (works on scalars and on arrays of candidates)."""
        return (((pr - 1) / self.params_tol) ** 2 + (((mr - 1) / self.macs_tol) ** 2 if self.M0 > 0 else 0.0)
                + DISTORTION_WEIGHT * distortion)

    def score(self, x: np.ndarray) -> Score:
        """(objective, params ratio, MACs ratio) of the S members at widths ``x``."""
        P, M = self.totals(x)
        pr, mr = self.S * P / max(self.P0, 1.0), self.S * M / max(self.M0, 1.0)
        distortion = float(np.mean(np.abs(np.log(np.maximum(x, 1.0)) - self.target_log))) if len(x) else 0.0
        return self.objective(pr, mr, distortion), pr, mr

    def inside(self, sc: Score, margin: float) -> bool:
        """Whether a score's ratios are within ``margin`` times the tolerances."""
        return abs(sc[1] - 1) <= self.params_tol * margin and abs(sc[2] - 1) <= self.macs_tol * margin

    def term_values(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Every params and MACs monomial's value at widths ``x`` (what :meth:`move_ratios` rescales)."""
        sz = self.cost.sizes(x)
        return np.prod(sz[self.p_idx], axis=1) * self.p_w, np.prod(sz[self.m_idx], axis=1) * self.m_w

    def move_ratios(self, values: Tuple[np.ndarray, np.ndarray], rho: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(params ratio, MACs ratio) of every single-group move, group ``i`` scaled by ``rho[i]``, scored at once
        from :meth:`term_values` at the widths moved from."""
        vp, vm = values
        pr = self.S * (vp @ (rho[None, :] ** self.Ep)) / max(self.P0, 1.0)
        mr = self.S * (vm @ (rho[None, :] ** self.Em)) / max(self.M0, 1.0) if self.M0 > 0 else np.ones_like(rho)
        return pr, mr

    def refine(self, x: np.ndarray, div: np.ndarray) -> np.ndarray:
        """Towards the uniform shrink, inside the tolerances: the group that deviates most moves one divisor step
        back, alone or with one other group's steps that keep parity, while (largest deviation, sum) drops."""
        margin = max(REFINE_MARGIN, self._margin(self.score(x)))
        if self.S == 1 or not self.nvars or not self.inside(self.score(x), margin):
            return x
        top = self._top(div)
        for _ in range(self.max_steps):
            dev = deviation(self.old, x, div, self.S)
            w = int(np.argmax(dev))
            if dev[w] <= 1e-12:
                break
            y = x.copy()
            y[w] -= div[w] * np.sign(x[w] / self.old[w] - self.f0)
            found = None
            values = self.term_values(y)
            for sign in REFINE_STEPS:  # y alone, then y with another group some steps up or down
                delta = np.where(np.arange(self.nvars) == w, 0.0, sign * div) if sign else np.zeros(self.nvars)
                z = y + delta
                pr, mr = self.move_ratios(values, z / y)
                d = deviation(self.old[None, :], np.where(np.eye(self.nvars, dtype=bool), z[:, None], y[None, :]),
                              div[None, :], self.S)
                key = d.max(1) + 1e-6 * d.sum(1)
                ok = ((z >= div) & (z <= top) & (np.abs(pr - 1) <= self.params_tol * margin)
                      & (np.abs(mr - 1) <= self.macs_tol * margin))
                key = np.where(ok, key, np.inf)
                i = int(np.argmin(key))
                if key[i] < dev.max() + 1e-6 * dev.sum() - 1e-12 and (found is None or key[i] < found[1]):
                    zz = y.copy()
                    zz[i] = z[i]
                    found = (zz, key[i])
                if found is not None and not sign:
                    break
            if found is None:
                break
            x = found[0]
        return x

    def _margin(self, sc: Score) -> float:
        return max(abs(sc[1] - 1) / self.params_tol, abs(sc[2] - 1) / self.macs_tol if self.M0 > 0 else 0.0)

    def steps(self, x: np.ndarray, best: Score, div: np.ndarray) -> Tuple[np.ndarray, Score]:
        """Single-group steps of one divisor, every candidate scored at once, while one improves."""
        old, target_log = self.old, self.target_log
        for _ in range(self.max_steps):
            if self.inside(best, STOP_MARGIN):
                break
            values = self.term_values(x)
            dist0 = np.abs(np.log(np.maximum(x, 1.0)) - target_log)
            cand = None
            for sign in (1.0, -1.0):
                y = x + sign * div
                ok = (y >= div) & (y <= old * MAX_GROWTH)
                pr, mr = self.move_ratios(values, y / x)
                dist = (dist0.sum() - dist0 + np.abs(np.log(np.maximum(y, 1.0)) - target_log)) / len(x)
                sc = np.where(ok, self.objective(pr, mr, dist), np.inf)
                i = int(np.argmin(sc))
                if sc[i] < best[0] - MIN_GAIN and (cand is None or sc[i] < cand[1][0]):
                    z = x.copy()
                    z[i] = y[i]
                    cand = (z, (float(sc[i]), float(pr[i]), float(mr[i])))
            if cand is None:
                break
            x, best = cand
        return x, best

    def _families(self) -> List[np.ndarray]:
        """Groups of one old width (every block's MLP hidden width), largest total width first."""
        old = self.old
        return sorted((np.flatnonzero(old == w) for w in np.unique(old)), key=lambda f: -old[f].sum())[:PAIR_FAMILIES]

    def pairs(self, x: np.ndarray, best: Score, div: np.ndarray) -> Tuple[np.ndarray, Score]:
        """Two families at once on a grid of factors. Where attention's N^2 x width MACs grow with a width that
        params also depend on, parity needs two families to move apart (the attention width down, the MLP hidden
        width up), which neither one global factor nor single-group steps reach."""
        fams, top = self._families(), self._top(div)
        for a, b, grid in ((a, b, g) for g in PAIR_GRIDS for a, b in itertools.combinations(fams, 2)):
            x0 = x
            for fa, fb in itertools.product(grid, grid):
                y = x0.copy()
                y[a] = _snap(x0[a] * fa, div[a])
                y[b] = _snap(x0[b] * fb, div[b])
                sc = self.score(np.minimum(y, top))
                if sc[0] < best[0] - MIN_GAIN:
                    x, best = np.minimum(y, top), sc
        return x, best

    def trios(self, x: np.ndarray, best: Score, div: np.ndarray) -> Tuple[np.ndarray, Score]:
        """Three families at once where two are not enough (gMixer: the embedding up, the token MLP at 1/2, the
        channel MLP at 1/5, where token-mixing weights do not shrink with the width), from the uniform shrink:
        the best point so far can sit where no family move leads out."""
        fams, top = self._families(), self._top(div)
        uniform = _snap(self.old * self.f0, div)
        for trio in itertools.combinations(fams[:TRIO_FAMILIES], 3) if not self.inside(best, 1.0) else ():
            for fs in itertools.product(TRIO_GRID, TRIO_GRID, TRIO_GRID):
                y = uniform.copy()
                for fam, fa in zip(trio, fs):
                    y[fam] = _snap(uniform[fam] * fa, div[fam])
                sc = self.score(np.minimum(y, top))
                if sc[0] < best[0] - MIN_GAIN:
                    x, best = np.minimum(y, top), sc
        return x, best

    def _top(self, div: np.ndarray) -> np.ndarray:
        return np.maximum(np.floor(self.old * MAX_GROWTH / div) * div, div)

    def calibrate(self, div: np.ndarray) -> Tuple[np.ndarray, Score]:
        """The uniform shrink, the best global factor, then single steps, at one set of divisors."""
        x = _snap(self.old * self.f0, div)
        best = self.score(x)
        if self.S == 1 or not self.nvars:
            return x, best
        for f in self.f0 * np.exp(np.linspace(-GLOBAL_SPAN, GLOBAL_SPAN, GLOBAL_STEPS)):
            y = _snap(self.old * f, div)
            sc = self.score(y)
            if sc[0] < best[0]:
                x, best = y, sc
        return self.steps(x, best, div)

    def run(self) -> Tuple[np.ndarray, Score, np.ndarray]:
        """The widths, their score and the divisors used."""
        found = None
        for cap in DIVISOR_CAPS:
            div_c = np.array([width_divisor(int(o), o * self.f0, cap) for o in self.old], dtype=np.float64)
            x_c, best_c = self.calibrate(div_c)
            if found is None or (self.inside(best_c, 1.0), -best_c[0]) > (self.inside(found[1], 1.0), -found[1][0]):
                found = (x_c, best_c, div_c)
            if self.inside(best_c, ACCEPT_MARGIN):
                break
        if self.S > 1 and not self.inside(found[1], 1.0):  # the family fallback, for attention-heavy models
            x_c, best_c, div_c = found
            x_c, best_c = self.trios(*self.pairs(x_c, best_c, div_c), div_c)
            found = (*self.steps(x_c, best_c, div_c), div_c)
        if self.uniform_refine:
            x_c = self.refine(found[0], found[2])
            found = (x_c, self.score(x_c), found[2])
        return found
