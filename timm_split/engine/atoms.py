"""Atoms: the union-find under the channel analysis.

Every dimension of every tensor in the traced graph is a product of *atoms*. Two atoms in one class always
have the same width. An atom can be *refined* into a product of atoms (a reshape of ``3*C`` into
``3 x heads x head_dim``, a grouped conv's ``C = groups x C/groups``) or into a sum of dimensions (``cat`` and
``split`` along channels). A class is *fixed* when its width must not change.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

__all__ = ["Atoms", "Dim", "NewWidths"]

Dim = Tuple[int, ...]  # a dimension: the product of these atoms


class Atoms:
    """Union-find over atoms, with multiplicative and additive refinement and a fixed flag per class."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.fixed: List[bool] = []
        self.prod: Dict[int, Tuple[int, ...]] = {}  # root -> ordered factor atoms
        self.sum: Dict[int, Tuple[Dim, ...]] = {}  # root -> summand dims
        self.why: Dict[int, str] = {}

    def new(self, size: int, fixed: bool = False, why: str = "") -> int:
        """A fresh atom of ``size``; size-1 atoms are always fixed."""
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.fixed.append(bool(fixed) or size <= 1)
        if fixed and why:
            self.why[i] = why
        return i

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def fix(self, a: int, why: str = "") -> None:
        """Fix an atom's class and everything it is refined into."""
        todo = [a]
        while todo:
            r = self.find(todo.pop())
            if self.fixed[r] and r not in self.prod and r not in self.sum:
                continue
            if not self.fixed[r]:
                self.fixed[r] = True
                if why:
                    self.why.setdefault(r, why)
            elif r in self.why or not why:
                pass
            todo.extend(self.prod.get(r, ()))
            for d in self.sum.get(r, ()):
                todo.extend(d)
            # refined-and-fixed atoms are expanded once; drop the refinement to stop revisiting
            self.prod.pop(r, None)
            self.sum.pop(r, None)

    def fix_dims(self, dims: Sequence[Dim], why: str) -> None:
        for d in dims:
            for a in d:
                self.fix(a, why)

    def union(self, a: int, b: int) -> None:
        """Make two atoms one class; their refinements (products or sums) are merged (see ``_merge``)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        assert self.size[ra] == self.size[rb], (self.size[ra], self.size[rb])
        self.parent[rb] = ra
        fixed = self.fixed[ra] or self.fixed[rb]
        # a concatenation meeting a product becomes a product where it can (the two are unified in _merge)
        if not (ra in self.prod and rb in self.sum and self.sum_to_prod(rb)):
            if rb in self.prod and ra in self.sum:
                self.sum_to_prod(ra)
        pa, pb = self.prod.pop(ra, None), self.prod.pop(rb, None)
        sa, sb = self.sum.pop(ra, None), self.sum.pop(rb, None)
        self.fixed[ra] = fixed
        if ra not in self.why and rb in self.why:
            self.why[ra] = self.why[rb]
        if self._merge(ra, pa, pb, sa, sb) and fixed:
            self.fix(ra)

    def _fix_atoms(self, dims, why: str) -> None:
        for d in dims:
            for x in d:
                self.fix(x, why)

    def _merge(self, ra: int, pa, pb, sa, sb) -> bool:
        """Give the root ``ra`` the merged refinement of two classes (products ``pa``/``pb``, sums ``sa``/``sb``).
        Returns False where the structures disagree: then the class and its parts are fixed here."""
        if (pa or pb) and (sa or sb):  # one side a product, the other a sum: no common structure
            self.fixed[ra] = True
            self._fix_atoms((pa or pb or (),), "product and sum refinements meet")
            self._fix_atoms(sa or sb or (), "product and sum refinements meet")
            return False
        if pa and pb:
            self.prod[ra] = pa
            self.unify(pa, pb)
        elif pa or pb:
            self.prod[ra] = pa or pb
        elif sa and sb:
            if [self.dim_size(d) for d in sa] != [self.dim_size(d) for d in sb]:
                self.fixed[ra] = True
                self._fix_atoms(sa + sb, "cat/split boundaries differ")
                return False
            self.sum[ra] = sa
            for x, y in zip(sa, sb):
                self.unify(x, y)
        elif sa or sb:
            self.sum[ra] = sa or sb
        return True

    def sum_to_prod(self, r: int) -> bool:
        """Rewrite a concatenation of k equal-width pieces as the product ``[k, piece]`` (the same row-major
        layout), tying the pieces' widths; or of pieces ``[h_i, *inner]`` as ``[sum h_i, *inner]``. Used only
        where a reshape needs the product view (qkv biases that are ``cat(q_bias, k_bias, v_bias)`` and then
        viewed as ``3 x heads x head_dim``)."""
        r = self.find(r)
        parts = self.sum.get(r)
        if not parts:
            return False
        # whole heads concatenated, ``[h1, hd] + [h2, hd] = [h1 + h2, hd]`` (CoaT's per-window head splits)
        leaves = [[self.find(a) for a in self.leaves(d)] for d in parts]
        if all(len(lv) > 1 and lv[1:] == leaves[0][1:] for lv in leaves):
            del self.sum[r]
            self.prod[r] = (self.make_sum([(lv[0],) for lv in leaves])[0], *leaves[0][1:])
            return True
        if len({self.dim_size(d) for d in parts}) != 1:
            return False
        for d in parts[1:]:
            self.unify(parts[0], d, "equal cat pieces")
        del self.sum[r]
        k = self.new(len(parts), fixed=True, why="cat of equal pieces")
        rest = self.new(self.dim_size(parts[0]), fixed=self.fixed[r])
        self.unify((rest,), parts[0], "equal cat pieces")
        self.prod[r] = (k, rest)
        return True

    def dim_size(self, d: Dim) -> int:
        return math.prod(self.size[self.find(a)] for a in d)

    def any_free(self, d: Dim) -> bool:
        """Whether some factor of the dim ``d`` can change width."""
        return any(not self.fixed[r] for r in self.leaves(d))

    def all_free(self, d: Dim) -> bool:
        """Whether every factor of the dim ``d`` can change width."""
        return not any(self.fixed[r] for r in self.leaves(d))

    def leaves(self, d: Dim) -> List[int]:
        """The finest known product factors of a dim (roots), size-1 atoms dropped."""
        out: List[int] = []
        todo = list(reversed(d))
        while todo:
            r = self.find(todo.pop())
            if r in self.prod:
                todo.extend(reversed(self.prod[r]))
            elif self.size[r] != 1:
                out.append(r)
        return out

    def refine(self, a: int, sizes: Sequence[int]) -> List[int]:
        """Refine the (unrefined) atom ``a`` into a product of new atoms of ``sizes``."""
        r = self.find(a)
        assert r not in self.prod and math.prod(sizes) == self.size[r]
        kids = tuple(self.new(s, fixed=self.fixed[r]) for s in sizes)
        if r in self.sum:  # an additive atom cannot also be split multiplicatively
            self.fix(r, "reshape of a concatenated dim")
            kids = tuple(self.new(s, fixed=True) for s in sizes)
        self.prod[r] = kids
        return list(kids)

    def unify(self, da: Sequence[int], db: Sequence[int], why: str = "reshape") -> None:
        """Make two atom products (of equal total size) equal, factor by factor, row-major."""
        la, lb = self.leaves(tuple(da)), self.leaves(tuple(db))
        i = j = 0
        while i < len(la) and j < len(lb):
            a, b = self.find(la[i]), self.find(lb[j])
            if a in self.prod or b in self.prod:  # refined by an earlier union in this walk
                la[i:i + 1], lb[j:j + 1] = self.leaves((a,)), self.leaves((b,))
                continue
            sa, sb = self.size[a], self.size[b]
            if a == b or sa == sb:
                self.union(a, b)
                i += 1
                j += 1
            elif sa < sb and sb % sa == 0 and (b not in self.sum or self.sum_to_prod(b)):
                lb[j:j + 1] = self.leaves((b,)) if b in self.prod else self.refine(b, (sa, sb // sa))
            elif sb < sa and sa % sb == 0 and (a not in self.sum or self.sum_to_prod(a)):
                la[i:i + 1] = self.leaves((a,)) if a in self.prod else self.refine(a, (sb, sa // sb))
            else:  # the factorings interleave: fix the smallest block where both products agree, go on
                pa, pb, i0, j0 = sa, sb, i, j
                i, j = i + 1, j + 1
                while pa != pb and i <= len(la) and j <= len(lb):
                    if pa < pb and i < len(la):
                        pa *= self.size[self.find(la[i])]
                        i += 1
                    elif pb < pa and j < len(lb):
                        pb *= self.size[self.find(lb[j])]
                        j += 1
                    else:
                        break
                if pa != pb:
                    i, j = len(la), len(lb)
                for x in la[i0:i] + lb[j0:j]:
                    self.fix(x, f"{why}: factors do not align")
        for x in la[i:] + lb[j:]:  # sizes disagree (should not happen): be safe
            self.fix(x, f"{why}: size mismatch")

    def split_sum(self, d: Dim, sizes: Sequence[int]) -> List[Dim]:
        """Split a dim additively into pieces of ``sizes``; reuse a matching ``cat`` structure."""
        leaves = self.leaves(d)
        if len(sizes) == 1:
            return [tuple(d)]
        inner = math.prod(self.size[a] for a in leaves[1:])
        if len(leaves) > 1 and all(s % inner == 0 for s in sizes):  # [heads, head_dim] split at whole heads
            heads = self.split_sum((leaves[0],), [s // inner for s in sizes])
            return [tuple(h) + tuple(leaves[1:]) for h in heads]
        if len(leaves) != 1:  # a composite dim split along its length: keep it as it is
            self.fix_dims([d], "split of a composite dim")
            return [(self.new(s, fixed=True),) for s in sizes]
        r = self.find(leaves[0])
        if r in self.sum:
            have = self.sum[r]
            if [self.dim_size(x) for x in have] == list(sizes):
                return list(have)
            # coarser pieces that sum exactly from the existing ones (split of a cat of more parts)
            out, k = [], 0
            for s in sizes:
                acc, group = 0, []
                while k < len(have) and acc < s:
                    acc += self.dim_size(have[k])
                    group.append(have[k])
                    k += 1
                if acc != s:
                    self.fix(r, "split boundaries differ from cat")
                    return [(self.new(s2, fixed=True),) for s2 in sizes]
                if len(group) == 1:
                    out.append(group[0])
                else:
                    a = self.new(s, fixed=self.fixed[r])
                    self.sum[a] = tuple(group)
                    out.append((a,))
            return out
        pieces = tuple((self.new(s, fixed=self.fixed[r]),) for s in sizes)
        self.sum[r] = pieces
        return list(pieces)

    def make_sum(self, dims: Sequence[Dim]) -> Dim:
        """A new atom that is the concatenation of ``dims``."""
        dims = [d for d in dims if self.dim_size(d) > 0]
        if len(dims) == 1:
            return tuple(dims[0])
        a = self.new(sum(self.dim_size(d) for d in dims))
        self.sum[a] = tuple(tuple(d) for d in dims)
        return (a,)


class NewWidths:
    """The new width of any atom or dim under a plan's group widths (free atoms outside the cost terms shrink
    by ``f0 = 1/sqrt(S)``).

    Args:
        atoms: the analysis' union-find.
        new_of: group root atom -> its planned width.
        f0: the default width factor.
    """

    def __init__(self, atoms: Atoms, new_of: Dict[int, int], f0: float):
        self.A, self.new_of, self.f0 = atoms, new_of, f0
        self.memo: Dict[int, int] = {}

    def atom(self, a: int) -> int:
        """The new width of atom ``a``."""
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
        """The new width of the product ``d``."""
        return math.prod(self.atom(a) for a in d)
