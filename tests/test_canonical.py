"""The backbone is planned at the architecture's cfg head and input (timm_split.engine.canonical, issue 19)."""
import pytest
import timm
import torch

import timm_split
from timm_split.count import count
from timm_split.trace import input_shape_for

ARCHS = ["test_resnet", "test_vit", "test_efficientnet"]
CASES = [dict(num_classes=10), dict(num_classes=0), dict(in_chans=1), dict(num_classes=0, global_pool=""),
         dict(num_classes=7, in_chans=2)]


def _shapes(ens):
    return {k: tuple(v.shape) for k, v in ens.state_dict().items()}


def _meta_split(arch, **kwargs):
    with torch.device("meta"):
        return timm_split.split(timm.create_model(arch, **kwargs), 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_backbone_widths_do_not_depend_on_head_or_input(arch, kwargs):
    ref, ens = _meta_split(arch), _meta_split(arch, **kwargs)
    want, got = _shapes(ref), _shapes(ens)
    model = timm.create_model(arch, **kwargs)
    head = set(ens.pretrained_cfg["classifier"] if isinstance(ens.pretrained_cfg["classifier"], (list, tuple))
               else [ens.pretrained_cfg["classifier"]])
    first = set(ens.pretrained_cfg["first_conv"])
    for k, shape in got.items():
        module = k.rsplit(".", 1)[0]
        if module in head:
            assert shape[0] == kwargs.get("num_classes", ref.num_classes), k
        elif module in first and "in_chans" in kwargs and len(shape) > 1:
            assert shape[1] == kwargs["in_chans"] and shape[0] == want[k][0], k
        else:
            assert shape == want[k], f"{k}: {shape} != {want[k]} (the default split's)"
    size = tuple(model.pretrained_cfg["input_size"][1:])
    assert ens.split_plan.planned_at == (("num_classes", ref.num_classes), ("in_chans", 3), ("img_size", size))
    assert "backbone planned at the cfg's num_classes" in str(ens.split_plan)
    # the plan counts this model's own head: its params are the members' real ones
    member_params = sum(p.numel() for p in ens.members[0].parameters())
    assert ens.split_plan.params == (sum(p.numel() for p in model.parameters()), 2 * member_params)
    assert ens.split_plan.planned_params == ref.split_plan.params


def test_default_head_plans_on_the_model_itself():
    assert _meta_split("test_resnet").split_plan.planned_at == ()


@pytest.mark.timeout(120)
def test_plan_at_model_gives_parity_at_the_models_own_head():
    with torch.device("meta"):
        model = timm.create_model("resnet50", num_classes=100)
        at_cfg, at_model = (timm_split.plan_split(model, 4, plan_at=w) for w in ("cfg", "model"))
    assert at_model.planned_at == () and abs(at_model.params_ratio - 1) <= 0.02
    assert at_cfg.planned_at and abs(at_cfg.planned_params[1] / at_cfg.planned_params[0] - 1) <= 0.02
    # resnet50's 1000-class head is 8% of its params: at 100 classes the cfg's plan is light, and says so
    assert at_cfg.params_ratio < 0.95 and f"{at_cfg.params_ratio:.4f}" in str(at_cfg)
    with pytest.raises(ValueError, match="plan_at must be"):
        timm_split.plan_split(model, 2, plan_at="head")


@pytest.mark.timeout(120)
def test_model_created_with_other_input_channels_splits_without_repeating_them():
    model = timm.create_model("test_resnet", in_chans=1, num_classes=4).eval()
    ens = timm_split.split(model, 2).eval()  # no in_chans=1 here: read from the model's in_chans
    assert ens(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    assert ens.split_plan.input_size[0] == ens.in_chans == 1


def _unregistered(model):
    """``model`` with a cfg that names no registered architecture: planned on its own copy reset to the cfg."""
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": None}
    return model


@pytest.mark.timeout(120)
@pytest.mark.parametrize("in_chans", [3, 1])
def test_input_channels_are_the_models_not_its_first_convs(in_chans):
    """TResNet's space-to-depth stem: its first conv sees 16x the input channels."""
    with torch.device("meta"):
        model = timm.create_model("tresnet_m", in_chans=in_chans)
    assert model.body.conv1.conv.in_channels == 16 * in_chans
    assert input_shape_for(model)[1] == in_chans
    plan = timm_split.plan_split(model, 2)
    assert plan.input_size[0] == in_chans and abs(plan.params_ratio - 1) < 0.03


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch,stem", [("tresnet_m", "body.conv1.conv.weight"),  # space-to-depth: 16 x in_chans
                                       ("naflexvit_base_patch16_parfac_gap", "embeds.proj.weight")])  # nn.Linear
def test_first_conv_reset_to_the_cfgs_input_keeps_its_factor(arch, stem):
    """A copy reset to the cfg's 3 channels scales the first conv's (or linear patch embedding's) input width by
    3 / in_chans; setting it to 3 made TResNet's copy fail, so its plan depended on in_chans."""
    with torch.device("meta"):
        ref = timm_split.plan_split(_unregistered(timm.create_model(arch)), 2)
        plan = timm_split.plan_split(_unregistered(timm.create_model(arch, in_chans=1)), 2)
    assert dict(plan.planned_at)["in_chans"] == 3
    assert plan.param_shapes[stem][1] * 3 == ref.param_shapes[stem][1]
    assert {k: v for k, v in plan.param_shapes.items() if k != stem} == \
        {k: v for k, v in ref.param_shapes.items() if k != stem}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("registered", [True, False])
def test_head_reset_unlike_the_constructors_is_planned_at_the_default(registered):
    """RepViT's ``reset_classifier`` gives the distillation head no BatchNorm, the constructor does: the registered
    default stands in for the copy reset to 1000 classes, so the backbone has the default's widths. Where it
    cannot (no registered architecture), the head's tensors the copy lacks take the widths of their features."""
    with torch.device("meta"):
        ref = timm_split.plan_split(timm.create_model("repvit_m0_9"), 2)
        model = timm.create_model("repvit_m0_9", num_classes=10)
        plan = timm_split.plan_split(model if registered else _unregistered(model), 2)
    assert plan.planned_at and dict(plan.planned_at)["num_classes"] == 1000
    head = {k for k in plan.param_shapes if k.startswith("head.")}
    assert "head.head_dist.bn.weight" in head
    if registered:
        assert {k: plan.param_shapes[k] for k in ref.param_shapes if k not in head} == \
            {k: v for k, v in ref.param_shapes.items() if k not in head}
    width = plan.param_shapes["head.head.bn.weight"][0]
    assert plan.param_shapes["head.head_dist.bn.weight"] == (width,) and width < 384
    assert plan.param_shapes["head.head_dist.l.weight"] == (10, width)


@pytest.mark.timeout(120)
def test_feature_extractor_without_pooling_has_the_default_backbone():
    """RepViT created as a feature extractor (``num_classes=0, global_pool=''``) is planned at the registered
    default, as at any other head: the copy reset to the cfg's head lacks the distillation head's BatchNorm and
    gave 102 backbone tensors other widths than the default split's, so its checkpoints did not load."""
    with torch.device("meta"):
        ref = timm_split.plan_split(timm.create_model("repvit_m0_9"), 2)
        plan = timm_split.plan_split(timm.create_model("repvit_m0_9", num_classes=0, global_pool=""), 2)
    backbone = [k for k in ref.param_shapes if not k.startswith("head.")]
    assert len(backbone) > 100 and dict(plan.planned_at)["num_classes"] == 1000
    assert {k: plan.param_shapes[k] for k in backbone} == {k: ref.param_shapes[k] for k in backbone}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["random", "inherit"])
def test_head_the_cfg_lacks_takes_the_width_of_its_features(init):
    """A cfg without a head (Hiera's: num_classes 0) and a model with one: the classifier, which the copy at the
    cfg lacks, takes the planned width of the features it reads, and inherits their channels."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 0}
    headless = timm.create_model("test_resnet", num_classes=0)
    headless.pretrained_cfg = model.pretrained_cfg
    with torch.device("meta"):
        ref = timm_split.plan_split(headless, 2)
    ens = timm_split.split(model, 2, init=init).eval()
    assert dict(ens.split_plan.planned_at)["num_classes"] == 0
    assert {k: v for k, v in ens.split_plan.param_shapes.items() if not k.startswith("fc.")} == ref.param_shapes
    width = ref.param_shapes["layer4.0.bn2.weight"][0]
    assert ens.members[0].fc.weight.shape == (10, width) < tuple(model.fc.weight.shape)
    assert ens(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    if init == "inherit":  # the columns of the channels its features inherited (scaled by the fan-in's ratio)
        cols = ens.members[0].fc.weight.t() * width / model.fc.in_features
        assert all(any(torch.allclose(c, o) for o in model.fc.weight.t()) for c in cols)


@pytest.mark.timeout(120)
def test_inherit_at_another_head_takes_the_models_own_head():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    ens = timm_split.split(model, 2, init="inherit")
    fc = ens.members[0].get_classifier()
    assert torch.isfinite(fc.weight).all() and fc.weight.shape[0] == 5
    assert torch.equal(fc.bias, model.get_classifier().bias), "the head's fixed dim is taken whole"


@pytest.mark.timeout(300)
def test_size_is_read_only_where_it_is_the_inputs():
    """Visformer's ``patch_embed1`` follows a stem (its ``img_size`` is a feature map's): the cfg size is used."""
    with torch.device("meta"):
        model = timm.create_model("visformer_tiny")
    assert input_shape_for(model)[2:] == tuple(model.pretrained_cfg["input_size"][1:])


def _differing(a, b):
    a, b = _shapes(a), _shapes(b)
    assert a.keys() == b.keys()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@pytest.mark.timeout(300)
def test_model_created_at_another_size_has_the_default_widths():
    """swin at 448 px with 14 px windows: planned at the cfg's 224 px (set_input_size on a meta copy), so only the
    window's relative-position tables differ from the default split and a 224 px checkpoint loads at 448 px."""
    name, kw = "swin_tiny_patch4_window7_224", dict(img_size=448, window_size=14)
    ref = _meta_split(name)
    ens = _meta_split(name, **kw)
    diff = _differing(ref, ens)
    assert diff and all(k.endswith("relative_position_bias_table") for k in diff), sorted(diff)[:4]
    assert all(a[1] == b[1] and (a[0], b[0]) == (13 ** 2, 27 ** 2) for a, b in diff.values())
    plan = ens.split_plan
    assert dict(plan.planned_at)["img_size"] == (224, 224) and plan.input_size == (3, 448, 448)
    # MACs are counted at the model's own size: 14 px windows cost more attention than planned at 7 px
    with torch.device("meta"):
        base = timm.create_model(name, **kw)
    # counted on the planner's basis (Cost.gmacs, all counted ops), as every other plan's line is
    want = count(base, 448, device="meta").gmacs
    assert plan.macs[0] == pytest.approx(want * 1e9, rel=1e-6)
    assert plan.macs[1] == pytest.approx(2 * count(ens.members[0], 448, device="meta").gmacs * 1e9, rel=1e-6)
    # plan_at='model' is parity at 448 px: other MLP widths
    with torch.device("meta"):
        own = timm_split.split(timm.create_model(name, **kw), 2, plan_at="model")
    assert {k for k in _differing(ref, own) if "mlp" in k}
    assert abs(own.split_plan.macs_ratio - 1) <= 0.04


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,kw", [
    ("swin_tiny_patch4_window7_224", dict(img_size=(232, 248))),  # resized to 224: 6 px windows
    pytest.param("swinv2_tiny_window8_256", dict(img_size=384, drop_path_rate=0.3),  # resized to 256: other windows
                 marks=pytest.mark.tier),
    pytest.param("swinv2_cr_tiny_224", dict(img_size=(232, 248), drop_path_rate=0.2), marks=pytest.mark.tier),
])
def test_size_scaled_choices_are_planned_as_registered(name, kw):
    """Resizing a model created at another size scales its windows with the grid, so a resized copy is not the
    default; the registered architecture stands in for it (same tensors and attributes but for the size): the
    default widths, the model's own windows in the members, and the model's own dropout rates divided."""
    ref, ens = _meta_split(name), _meta_split(name, **kw)
    diff = _differing(ref, ens)
    assert all("relative_position" in k or "attn_mask" in k for k in diff), sorted(diff)[:4]
    with torch.device("meta"):
        model = timm.create_model(name, **kw)
    windows = [b.window_size for b in model.modules() if hasattr(b, "window_size") and hasattr(b, "attn")]
    got = [b.window_size for b in ens.members[0].modules() if hasattr(b, "window_size") and hasattr(b, "attn")]
    assert windows and got == windows
    rates = {(path, attr): (old, new) for path, attr, old, new in ens.split_plan.regularization}
    own = {n: m.drop_prob for n, m in model.named_modules() if getattr(m, "drop_prob", 0) > 0}
    assert own and all(rates[(n, "drop_prob")] == (p, p / 2) for n, p in own.items())


@pytest.mark.timeout(300)
def test_other_architecture_is_not_planned_as_registered():
    """A model that differs from its registered architecture in more than its size (num_heads) is planned on its
    own resized copy: its heads are not the default split's."""
    name = "swin_tiny_patch4_window7_224"
    ens = _meta_split(name, img_size=448, num_heads=(6, 12, 24, 48))
    attn = ens.members[0].layers[0].blocks[0].attn
    assert attn.num_heads != _meta_split(name).members[0].layers[0].blocks[0].attn.num_heads
    assert attn.qkv.out_features % (3 * attn.num_heads) == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,size", [("coat_lite_tiny", 128), ("twins_svt_small", 160)])
def test_size_is_read_from_the_module_owning_the_first_conv(arch, size):
    """CoaT and Twins keep ``img_size`` in the patch embedding that owns their cfg's ``first_conv``
    (``patch_embed1.proj``, ``patch_embeds.0.proj``): a model created at another size is traced at it."""
    with torch.device("meta"):
        model = timm.create_model(arch, img_size=size)
    assert input_shape_for(model)[2:] == (size, size)


@pytest.mark.timeout(300)
def test_patch_grid_matched_by_value_is_kept():
    """CoaT at 128 px: ``patch_embed2.grid_size == (16, 16)`` equals a head_dim of 16 by value, and its own module
    never reads it (running it alone cannot tell). A patch grid is never taken for a width, so the split runs,
    at parity, with the grid the model was built for (timm's prune test builds coat at 128 px)."""
    with torch.device("meta"):
        ens = timm_split.split(timm.create_model("coat_lite_tiny", img_size=128), 2)
    assert all(m.patch_embed2.grid_size == (16, 16) for m in ens.members)
    assert ens.split_plan.input_size == (3, 128, 128) and abs(ens.split_plan.params_ratio - 1) <= 0.02
