"""Computed tables (timm_split.engine.tables): a layer's cached table (RoPE's sin/cos ``pos_embed``) keeps its
layout at the planned widths and is recomputed by the layer's own code, never cut."""
import copy

import pytest
import timm
import torch

import timm_split
from timm_split.engine.tables import table_layout

ROPE_ARCHS = ["eva02_tiny_patch14_224", "vit_betwixt_patch16_rope_reg4_gap_256", "vit_pe_core_tiny_patch16_384"]


def _ropes(model):
    return [(p, m) for p, m in model.named_modules() if table_layout(m) is not None]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ROPE_ARCHS)
@pytest.mark.parametrize("S", [2, 4])
def test_rope_table_widths_stay_consistent(arch, S):
    """``pos_embed`` width = 2 (sin, cos) x ndim x bands x 2 and ``dim = 4 * bands`` in every plan (before the
    tie, eva02_tiny got bands 11 beside a 68-wide table: 34 columns of each half were the other's)."""
    with torch.device("meta"):
        model = timm.create_model(arch)
        ens = timm_split.split(model, S)
    ropes = _ropes(ens.members[0])
    assert ropes, "no RoPE table found"
    for _, r in ropes:
        ndim = len(r.feat_shape)
        assert r.pos_embed.shape[-1] == 4 * ndim * r.bands.shape[0] and r.dim == 4 * r.bands.shape[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("init", ["random", "inherit"])
def test_rope_tables_are_the_layers_own_at_the_new_dim(init):
    """Every member's table is what timm's layer computes at the member's ``dim`` (a valid rotation: sin^2 + cos^2
    = 1), whichever init; ``set_input_size`` recomputes them at another grid (timm's non-std cfg test calls it;
    before the fix it raised, the layer's ``dim`` being the base's)."""
    model = timm.create_model("eva02_tiny_patch14_224")
    ens = timm_split.split(model, 2, init=init)
    base_rope = model.rope
    for member in ens.members:
        r = member.rope
        assert r.dim < base_rope.dim  # head_dim shrinks, and the table with it
        ref = copy.deepcopy(base_rope)  # the base's layer, rebuilt at the member's dim by timm's own code
        ref.dim = r.dim
        ref.bands = torch.empty(r.dim // 4)
        ref.pos_embed = torch.empty(r.pos_embed.shape[0], 2 * r.dim)
        ref.init_non_persistent_buffers()
        assert torch.equal(ref.pos_embed, r.pos_embed) and torch.equal(ref.bands, r.bands)
        sin, cos = r.pos_embed.chunk(2, -1)
        torch.testing.assert_close(sin ** 2 + cos ** 2, torch.ones_like(sin))
    # timm's frozen-weights test resizes with set_input_size: the members' layers recompute at their own dim
    ens.set_input_size(img_size=(112, 112))
    for member in ens.members:
        sin, cos = member.rope.pos_embed.chunk(2, -1)
        assert member.rope.pos_embed.shape == (64, 2 * member.rope.dim)
        torch.testing.assert_close(sin ** 2 + cos ** 2, torch.ones_like(sin))
