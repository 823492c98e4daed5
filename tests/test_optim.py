"""Tests for timm_split.training.optim."""
import math

import pytest
import torch
from torch import nn

from timm_split.training.optim import param_groups, scaled_weight_decay


def test_scaled_weight_decay():
    assert scaled_weight_decay(5e-4, 1) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 2) == pytest.approx(5e-4 * math.exp(-0.5))
    assert scaled_weight_decay(1e-4, 4) == pytest.approx(1e-4 * math.exp(-0.75))
    assert scaled_weight_decay(0.0, 4) == 0.0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="split_factor"):
            scaled_weight_decay(5e-4, bad)
    with pytest.raises(ValueError, match="weight_decay"):
        scaled_weight_decay(-1e-4, 2)


class Member(nn.Module):
    """timm-style model with a no_weight_decay() hook."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def no_weight_decay(self):
        return {"pos_embed"}


class Ensemble(nn.Module):
    def __init__(self):
        super().__init__()
        self.members = nn.ModuleList([Member(), Member()])


def _groups_by_wd(groups):
    return {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}


def test_param_groups_split_and_no_weight_decay():
    model = Ensemble()
    groups = param_groups(model, 5e-4, 2, no_weight_decay_list=("members.1.fc.weight",))
    by_wd = _groups_by_wd(groups)
    wd = scaled_weight_decay(5e-4, 2)
    assert set(by_wd) == {0.0, wd}
    decayed = {id(p) for p in (model.members[0].conv.weight, model.members[0].fc.weight,
                               model.members[1].conv.weight)}
    assert by_wd[wd] == decayed
    # pos_embed (from each member's no_weight_decay()), biases, norms and the explicit name get none
    assert id(model.members[0].pos_embed) in by_wd[0.0]
    assert id(model.members[1].pos_embed) in by_wd[0.0]
    assert id(model.members[1].fc.weight) in by_wd[0.0]
    assert id(model.members[0].bn.weight) in by_wd[0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_top_level_no_weight_decay_and_sgd():
    model = Member()
    groups = param_groups(model, 5e-4, 1)
    assert id(model.pos_embed) in _groups_by_wd(groups)[0.0]
    assert _groups_by_wd(groups)[5e-4] == {id(model.conv.weight), id(model.fc.weight)}
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    loss = model.fc(torch.randn(2, 8)).sum() + model.conv(torch.randn(1, 3, 5, 5)).sum() + model.pos_embed.sum()
    loss.backward()
    before = model.conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.conv.weight)


def test_param_groups_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1, img_size=32,
                              patch_size=8)
    groups = param_groups(model, 0.05, 2)
    by_wd = _groups_by_wd(groups)
    assert id(model.pos_embed) in by_wd[0.0] and id(model.cls_token) in by_wd[0.0]
    assert id(model.blocks[0].attn.qkv.weight) in by_wd[scaled_weight_decay(0.05, 2)]


def test_param_groups_bad_list():
    with pytest.raises(ValueError, match="collection"):
        param_groups(Member(), 5e-4, 2, no_weight_decay_list="pos_embed")


def _split_resnet(S: int):
    import timm_split
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    return timm_split.split(net, S, img_size=16)


@pytest.mark.timeout(60)
def test_param_groups_reads_split_factor_from_the_model():
    ens = _split_resnet(4)
    want = {scaled_weight_decay(5e-4, 4), 0.0}
    assert set(_groups_by_wd(param_groups(ens, 5e-4))) == want
    assert set(_groups_by_wd(param_groups(ens, 5e-4, 4))) == want  # an explicit S that agrees is fine
    # behind a wrapper (as DDP or torch.compile wrap it), S is still the ensemble's
    assert set(_groups_by_wd(param_groups(nn.Sequential(ens), 5e-4))) == want
    with pytest.raises(ValueError, match=r"split_factor=2 disagrees with the model's split_factor=4"):
        param_groups(ens, 5e-4, 2)


def test_param_groups_unsplit_model_defaults_to_one():
    assert set(_groups_by_wd(param_groups(Member(), 5e-4))) == {5e-4, 0.0}
