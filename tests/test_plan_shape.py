"""Plan shape (issue 15): among the plans within tolerance, the one closest to a uniform 1/sqrt(S) shrink."""
import math

import numpy as np
import pytest
import timm
import torch

import timm_split
from timm_split.engine.search import deviation


def test_deviation_counts_only_what_rounding_does_not_force():
    old = np.array([64.0, 128.0, 30.0])
    div = np.array([8.0, 8.0, 2.0])
    f = 1 / math.sqrt(2)
    uniform = np.round(old * f / div) * div  # 48, 88, 22: as uniform as the divisors allow
    assert np.allclose(deviation(old, uniform, div, 2), 0.0)
    off = uniform + np.array([8.0, 0.0, 0.0])  # one divisor step further from 45.25 than 48 is
    want = abs(56 / 64 - f) - abs(48 / 64 - f)
    assert deviation(old, off, div, 2) == pytest.approx([want, 0.0, 0.0])
    assert np.allclose(deviation(old, old / 2, div / 2, 4), 0.0)  # S=4: exactly half


def _plan(arch, S, refine):
    with torch.device("meta"):
        model = timm.create_model(arch)
    return timm_split.plan_split(model, S, refine=refine)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,S", [("resnet50", 4), ("deit_tiny_patch16_224", 2)])
def test_refine_moves_towards_the_uniform_shrink_within_tolerance(arch, S):
    before, after = _plan(arch, S, False), _plan(arch, S, True)
    assert after.max_deviation < before.max_deviation  # docs/plan_shape.md: 0.125 -> 0.031 and 0.5 -> 0.125
    for p in (before, after):
        assert abs(p.params_ratio - 1) <= 0.02 and abs(p.macs_ratio - 1) <= 0.04
    old, new, div = (np.array([getattr(g, k) for g in after.groups], dtype=float) for k in ("old", "new", "divisor"))
    assert after.max_deviation == pytest.approx(deviation(old, new, div, S).max())
    assert f"{after.max_deviation:.3f}" in str(after)
    assert all(g.new % g.divisor == 0 for g in after.groups)
