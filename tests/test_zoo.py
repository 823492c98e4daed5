"""The whole timm zoo (issue 3), parametrized over timm's registry like timm's tests/test_models.py.

Parity tier (``pytest -m tier``, run by CI after the default run): on meta, one small architecture per timm
module at S=2, and the acceptance list (tests/conftest.py) at S=2 and 4: every member runs, the output shape is
the original's, and params/FLOPs counted with fvcore are within 2%/4%. The full sweep (every architecture, S=2
and 4, and a CPU forward/backward at S=2 for those under 30M params) is ``pytest -m sweep`` (slow), or
``timm-split sweep`` (``--device cpu`` for the CPU tier), which writes docs/zoo.csv.
"""
import fnmatch
import os

import pytest

from timm_split.commands.sweep import default_tier, select, sweep_one

from conftest import ACCEPTANCE

# filters in the style of timm's tests: TIMM_SPLIT_FILTER='vit_*' narrows every tier
_FILTER = os.environ.get("TIMM_SPLIT_FILTER", "*")
DEFAULT = [a for a in default_tier() if fnmatch.fnmatch(a, _FILTER)]
# arch -> split factors of the parity tier: the acceptance list at 2 and 4, the other default-tier archs at 2
PARITY = {**{a: (2,) for a in DEFAULT}, **{a: (2, 4) for a in ACCEPTANCE if fnmatch.fnmatch(a, _FILTER)}}


def _check(arch, split_factors):
    rows = sweep_one(arch, split_factors)
    bad = [(r["split"], r["status"], r.get("reason")) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    for r in rows:
        assert abs(r["params_ratio"] - 1) <= 0.02 and abs(r["gmacs_ratio"] - 1) <= 0.04


@pytest.mark.tier
@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch", sorted(PARITY))
def test_meta_parity(arch):
    _check(arch, PARITY[arch])


@pytest.mark.sweep
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", select((_FILTER,)))
def test_zoo_sweep(arch):
    _check(arch, (2, 4))


@pytest.mark.sweep
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", select((_FILTER,)))
def test_zoo_cpu_forward_backward(arch):
    """Every architecture under 30M params: a real CPU forward and backward of the S=2 ensemble at 64 px (or
    the model's fixed size), every parameter reached by the gradient."""
    (row,) = sweep_one(arch, (2,), device="cpu", cpu_max_params=30e6, cpu_img_size=64)
    if row["status"] == "ok" and not row["cpu_checked"]:
        pytest.skip(f"{row['params_orig'] / 1e6:.1f}M params: over the CPU tier's 30M")
    assert row["status"] == "ok" and row["cpu_checked"], (row["status"], row.get("reason"))


def test_default_tier_covers_every_module():
    import timm
    modules = {timm.models._registry._model_to_module[a] for a in default_tier()}
    assert modules == {m for m in timm.list_modules() if m != "splitnet"}


def test_default_tier_reads_the_shipped_reference():
    """default_tier picks the fewest params per module from the reference CSV shipped inside the package (an
    installed wheel has it; tests/ is not installed): CaiT's pick is its smallest, not the first name."""
    from timm_split.commands import sweep

    package = os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))  # timm_split/
    assert os.path.exists(sweep.REFERENCE_CSV)
    assert os.path.commonpath([os.path.abspath(sweep.REFERENCE_CSV), package]) == package
    assert "cait_xxs24_224" in default_tier() and "cait_m36_384" not in default_tier()


@pytest.mark.tier
@pytest.mark.timeout(300)
def test_cpu_check_falls_back_to_the_own_size():
    """The CPU tier's small size is used only where the architecture runs at it: CrossViT cannot at 64 px and
    is checked at its own 240 px."""
    (row,) = sweep_one("crossvit_tiny_240", (2,), device="cpu", cpu_img_size=64)
    assert row["status"] == "ok" and row["cpu_checked"], (row["status"], row.get("reason"))


@pytest.mark.timeout(300)
def test_members_counted_at_the_base_size():
    """A member's ``img_size`` attribute can be planned as a width where its value equals one (maxvit_pico's 256);
    the sweep counts members at the size the base model was counted at, not at the member's attribute."""
    rows = sweep_one("maxvit_pico_rw_256", (2,))
    assert [r["status"] for r in rows] == ["ok"], rows
    assert abs(rows[0]["gmacs_ratio"] - 1) <= 0.04
