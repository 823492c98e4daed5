"""timm's model contract for ``splitnet_<arch>`` (issue 19): the assertions of timm's tests/test_models.py for
default_cfgs, forward_features, forward_intermediates, features_only, fx and TorchScript, on our own code.

The default run covers a fast tier (timm's test_* models and a few small real ones); the rest of the default
tier (one small architecture per timm module, as tests/test_zoo.py picks it) is ``-m slow``. Inputs are
small (``TARGET`` px unless the model's input size is fixed) and each check is also made against the base
model at the same size: the ensemble must behave as one backbone with S times a member's channels.
"""
import math

import pytest
import timm
import torch

import timm_split  # noqa: F401 - registers splitnet_<arch>
from conftest import tier_params

TARGET = 64  # px: every forward here runs at this size or the model's fixed size

# timm's lists (tests/test_models.py at timm 1.0.x): token/hybrid models with a different feature contract
NON_STD = ["vit_*", "naflexvit*", "tnt_*", "pit_*", "coat_*", "cait_*", "*mixer_*", "gmlp_*", "resmlp_*", "twins_*",
           "convit_*", "levit*", "visformer*", "deit*", "xcit_*", "crossvit_*", "beit*", "aimv2*", "swiftformer_*",
           "poolformer_*", "volo_*", "sequencer2d_*", "mvitv2*", "gcvit*", "efficientformer*", "sam_hiera*", "eva_*",
           "flexivit*", "eva02*", "samvit_*", "efficientvit_m*", "tiny_vit_*", "hiera_*", "vitamin*", "test_vit*",
           "gemma4_vit*"]
EXCLUDE_JIT = ["hiera_*", "*naflex*", "hrnet*", "dpn*", "densenet*", "selecsls*", "gemma4_vit*"]
EXCLUDE_FX = ["vit_gi*", "hiera*", "gemma4_vit*"]
EXCLUDE_FX_JIT = ["deit_*_distilled_patch16_224", "levit*", "pit_*_distilled_224"]
FEAT_INTER_MODULES = [
    "vision_transformer", "vision_transformer_sam", "vision_transformer_hybrid", "vision_transformer_relpos", "beit",
    "mvitv2", "eva", "cait", "xcit", "volo", "twins", "deit", "swin_transformer", "swin_transformer_v2",
    "swin_transformer_v2_cr", "maxxvit", "efficientnet", "mobilenetv3", "levit", "efficientformer", "resnet",
    "regnet", "byobnet", "byoanet", "mlp_mixer", "hiera", "fastvit", "hieradet_sam2", "tnt", "tiny_vit", "vovnet",
    "tresnet", "rexnet", "resnetv2", "repghost", "repvit", "pvt_v2", "nextvit", "nest", "mambaout", "inception_next",
    "inception_v4", "hgnet", "gcvit", "focalnet", "efficientformer_v2", "edgenext", "davit", "rdnet", "convnext",
    "pit", "starnet", "shvit", "fasternet", "swiftformer", "ghostnet", "naflexvit", "csatv2"]


def _module(arch):
    return timm.models._registry._model_to_module.get(arch, "")


def _input_size(model):
    """timm's _get_input_size with a small target: the cfg size if fixed, else at most TARGET px."""
    cfg = model.default_cfg
    size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return size
    low = cfg.get("min_input_size") or size
    return (size[0], *[max(min(s, TARGET), m) for s, m in zip(size[1:], low[1:])])


def _create(arch, split=True, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(f"splitnet_{arch}" if split else arch, pretrained=False, **kwargs)


def _fmt(model):
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


def _spatial_and_channel_axes(fmt):
    return ((1, 2), 3) if fmt == "NHWC" else ((2, 3), 1)


def _check_names(model):
    """timm's check: cfg classifier and first_conv name real parameters of the model."""
    cfg, keys = model.default_cfg, model.state_dict().keys()
    if cfg.get("num_classes"):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in keys, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in keys, f"{fc} not in model params"


EARLY_POOL = tuple(getattr(timm.models, n) for n in (
    "EfficientVit", "EfficientVitLarge", "FasterNet", "HighPerfGpuNet", "GhostNet", "MetaNeXt", "MobileNetV3",
    "RepGhostNet", "VGG") if hasattr(timm.models, n))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=NON_STD))
def test_default_cfgs(arch):
    model, base = _create(arch).eval(), _create(arch, split=False).eval()
    S = model.split_factor
    assert model.in_chans == model.default_cfg["input_size"][0] == getattr(base, "in_chans", 3)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    fmt = _fmt(model)
    assert fmt == _fmt(base)
    spatial, feat_axis = _spatial_and_channel_axes(fmt)
    x = torch.randn((1, *_input_size(model)))
    with torch.no_grad():
        out, ref = model.forward_features(x), base.forward_features(x)
        pre = model.forward_head(out, pre_logits=True)
        if isinstance(ref, (list, tuple)):  # timm's assertions fail for the base too (EfficientViM's stage list)
            assert len(out) == len(ref) and pre.shape[1] == model.head_hidden_size
            pytest.skip(f"{arch}.forward_features returns {len(ref)} tensors: timm's test does not hold for it")
        assert [out.shape[a] for a in spatial] == [ref.shape[a] for a in spatial], "spatial size differs from base"
        if tuple(x.shape[1:]) == tuple(model.default_cfg["input_size"]):
            assert [out.shape[a] for a in spatial] == list(model.default_cfg["pool_size"])
        assert out.shape[feat_axis] == model.num_features == S * model.members[0].num_features
        assert pre.shape[1] == model.head_hidden_size
        # the base model's own semantics hold for each member
        member_out = model.members[0].forward_features(x)
        assert ref.shape[feat_axis] == base.num_features and member_out.shape[feat_axis] == model.num_features // S
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.dim() == 2 and pooled.shape == pre.shape and pooled.shape[1] == model.head_hidden_size
        if not isinstance(model.members[0], EARLY_POOL):
            model.reset_classifier(0, "")
            unpooled = model(x)
            assert unpooled.dim() == 4 and [unpooled.shape[a] for a in spatial] == [ref.shape[a] for a in spatial]
            headless = _create(arch, num_classes=0, global_pool="").eval()
            unpooled = headless(x)
            assert unpooled.dim() == 4 and [unpooled.shape[a] for a in spatial] == [ref.shape[a] for a in spatial]
    _check_names(model)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(NON_STD))
def test_default_cfgs_non_std(arch):
    model, base = _create(arch).eval(), _create(arch, split=False).eval()
    assert model.in_chans == model.default_cfg["input_size"][0] == getattr(base, "in_chans", 3)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn((1, *_input_size(model)))
    with torch.no_grad():
        out, ref = model.forward_features(x), base.forward_features(x)
        pre = model.forward_head(out, pre_logits=True)
        if isinstance(out, (tuple, list)):  # cannot verify multi-tensor output (as timm)
            out, ref = out[0], ref[0]
        else:
            feat_dim = -1 if out.ndim == 3 else 1
            assert out.shape[feat_dim] == model.num_features and pre.shape[1] == model.head_hidden_size
            assert ref.shape[feat_dim] == base.num_features
        assert out.ndim == ref.ndim and out.shape[0] == ref.shape[0]
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        pooled = pooled[0] if isinstance(pooled, (tuple, list)) else pooled
        feat_dim = -1 if pooled.ndim == 3 else 1
        assert pooled.shape[feat_dim] == model.head_hidden_size and pooled.shape == pre.shape
        headless = _create(arch, num_classes=0).eval()
        pooled = headless(x)
        pooled = pooled[0] if isinstance(pooled, (tuple, list)) else pooled
        assert pooled.shape[-1 if pooled.ndim == 3 else 1] == headless.num_features
    _check_names(model)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params())
def test_reset_classifier(arch):
    """A new head of any size on every member, sized from the member's real width (as the base model's is)."""
    model = _create(arch).eval()
    x = torch.randn((2, *_input_size(model)))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        for n in (10, 0, 3):
            model.reset_classifier(n)
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            assert model.num_classes == n and out.shape == ((2, 10) if n == 10 else (2, 3) if n else pre.shape)
        assert model.head_hidden_size == pre.shape[1]
    # timm's check: a head reset on a meta float64 model is made on the model's device and dtype
    base_heads = _create(arch, split=False).get_classifier()
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    heads = model.get_classifier()
    assert len(heads) == model.split_factor * (len(base_heads) if isinstance(base_heads, (tuple, list)) else 1)
    params = list(heads.parameters())
    assert params and all(p.is_meta and p.dtype == torch.float64 for p in params)


def _check_levels(outputs, channels, reductions, input_size, fmt="NCHW", batch_size=1):
    spatial, feat_axis = _spatial_and_channel_axes(fmt)
    assert len(channels) == len(outputs)
    for e, r, o in zip(channels, reductions, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial[0]] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[spatial[1]] <= math.ceil(input_size[-1] / r) + 1
        assert o.shape[0] == batch_size and not torch.isnan(o).any()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=NON_STD))
def test_features_only(arch):
    base = _create(arch, split=False, features_only=True).eval()
    model = _create(arch, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3 and len(channels) == len(base.feature_info.channels())
    assert reductions == base.feature_info.reduction()
    size = _input_size(model)
    x = torch.randn((1, *size))
    with torch.no_grad():
        outs, refs = model(x), base(x)
    fmt = _fmt(model)
    assert fmt == _fmt(base)
    _check_levels(outs, channels, reductions, size, fmt)
    spatial, _ = _spatial_and_channel_axes(fmt)
    assert [[o.shape[a] for a in spatial] for o in outs] == [[o.shape[a] for a in spatial] for o in refs]
    # one level out, as timm's out_indices
    last = _create(arch, features_only=True, out_indices=(-1,)).eval()
    base_last = _create(arch, split=False, features_only=True, out_indices=(-1,)).eval()
    with torch.no_grad():
        (o,), (r,) = last(x), base_last(x)
    assert [o.shape[a] for a in spatial] == [r.shape[a] for a in spatial]
    assert last.feature_info.channels() == [o.shape[1 if fmt == "NCHW" else -1]]
    if [o.shape[a] for a in spatial] == [outs[-1].shape[a] for a in spatial]:  # (-1,) is the default's last level
        assert torch.allclose(o, outs[-1], atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=NON_STD))
def test_features_only_grad_checkpointing_backward(arch):
    """timm's check: a features_only backbone trained with gradient checkpointing gives the same gradients."""
    x = torch.randn((2, *_input_size(_create(arch))))
    grads = []
    for checkpointing in (False, True):
        model = _create(arch, features_only=True).train()
        model.set_grad_checkpointing(checkpointing)
        sum(f.pow(2).mean() for f in model(x)).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=NON_STD))
def test_forward_intermediates_features(arch):
    if _module(arch) not in FEAT_INTER_MODULES:
        pytest.skip(f"timm's forward_intermediates tests do not cover module {_module(arch)}")
    model = _create(arch, features_only=True, feature_cls="getter").eval()
    size = _input_size(model)
    with torch.no_grad():
        outs = model(torch.randn((1, *size)))
    _check_levels(outs, model.feature_info.channels(), model.feature_info.reduction(), size)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["test_efficientnet", "mobilenetv3_small_050"])
def test_prune_extra_blocks_stem_width(arch):
    """timm's check: pruning to the stem (EfficientNet's ``extra_blocks``) leaves a model of the stem's width."""
    model = _create(arch)
    model.prune_intermediate_layers([0], extra_blocks=True)
    model.reset_classifier(7, "avg")
    x = torch.randn(2, 3, TARGET, TARGET)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == model.num_features
    assert model.num_features == model.split_factor * model.members[0].num_features
    assert model.members[0].num_features == model.members[0].conv_stem.out_channels  # the member's own stem
    assert model(x).shape == (2, 7)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params())
def test_forward_intermediates(arch):
    if _module(arch) not in FEAT_INTER_MODULES:
        pytest.skip(f"timm's forward_intermediates tests do not cover module {_module(arch)}")
    model, base = _create(arch).eval(), _create(arch, split=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    assert info.reduction() == timm.models.FeatureInfo(base.feature_info, len(base.feature_info)).reduction()
    size = _input_size(model)
    x = torch.randn((1, *size))
    with torch.no_grad():
        output, inter = model.forward_intermediates(x, output_fmt="NCHW")
        _, ref = base.forward_intermediates(x, output_fmt="NCHW")
        _check_levels(inter, info.channels(), info.reduction(), size)
        assert [t.shape[2:] for t in inter] == [t.shape[2:] for t in ref]
        assert torch.allclose(output, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[len(inter) - 1], intermediates_only=True, stop_early=True)
        assert len(only) == 1 and torch.allclose(only[0], inter[-1], atol=1e-5)
        try:
            model.set_grad_checkpointing()
        except Exception:  # as timm: a member that does not support it may raise
            pass
        else:
            output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
            assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)
    kept = model.prune_intermediate_layers([1], prune_head=True)
    assert model.num_classes == 0 and list(kept) == [1]


def _fx_model(model, train=False):
    """timm's _create_fx_model: torchvision's feature extractor with timm's leaf modules and functions."""
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return, train_return = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = fe.NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes.keys()]
    return fe.create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                       tracer_kwargs=tracer_kwargs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=EXCLUDE_FX))
def test_forward_fx(arch):
    model = _create(arch).eval()
    x = torch.randn((1, *_input_size(model)))
    with torch.inference_mode():
        outputs = model(x)
        fx_outputs = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_outputs, outputs) and outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    # timm's own fx helpers
    from timm.layers._fx import create_feature_extractor, get_graph_node_names
    last = get_graph_node_names(model)[1][-1]
    with torch.inference_mode():
        assert torch.equal(create_feature_extractor(model, [last])(x)[last], outputs)
    # plain torch.fx.symbolic_trace, where the base model traces without timm's leaf lists
    try:
        torch.fx.symbolic_trace(_create(arch, split=False).eval())
    except Exception:
        return
    with torch.inference_mode():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), outputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=EXCLUDE_FX))
def test_backward_fx(arch):
    model = _create(arch, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    size = _input_size(model)
    fx = _fx_model(model, train=True)
    outputs = torch.cat(tuple(fx(torch.randn((2, *size))).values()))
    outputs.mean().backward()
    for n, p in fx.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    assert sum(p.grad.numel() for p in fx.parameters() if p.grad is not None) == num_params


def _scripted_base_or_skip(arch, size):
    with timm.layers.set_scriptable(True):
        base = _create(arch, split=False).eval()
    try:
        torch.jit.script(base)(torch.randn((1, *size)))
    except Exception as e:  # the contract is: the ensemble scripts where its base does
        pytest.skip(f"the base {arch} does not script: {type(e).__name__}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=EXCLUDE_JIT))
def test_forward_torchscript(arch):
    with timm.layers.set_scriptable(True):
        model = _create(arch).eval()
    size = _input_size(model)
    _scripted_base_or_skip(arch, size)
    x = torch.randn((1, *size))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out, ref = scripted(x), model(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any() and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", tier_params(exclude=EXCLUDE_JIT + EXCLUDE_FX_JIT + EXCLUDE_FX))
def test_forward_fx_torchscript(arch):
    with timm.layers.set_scriptable(True):
        model = _create(arch).eval()
    size = _input_size(model)
    _scripted_base_or_skip(arch, size)
    scripted = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(torch.randn((1, *size))).values()))
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["test_resnet", pytest.param("regnetx_002", marks=pytest.mark.slow)])
def test_forward_torchscript_with_features_fx(arch):
    """timm's check: ``features_only`` with ``feature_cls='fx'`` scripts, and the script gives the same levels."""
    with timm.layers.set_scriptable(True):
        model = _create(arch, features_only=True, feature_cfg={"feature_cls": "fx"}).eval()
    x = torch.randn((1, *_input_size(_create(arch))))
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        outs, refs = scripted(x), model(x)
    assert isinstance(outs, list) and len(outs) == len(refs) == len(model.feature_info.channels())
    for o, r, c in zip(outs, refs, model.feature_info.channels()):
        assert o.shape[0] == 1 and o.shape[1] == c and torch.allclose(o, r, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["test_efficientnet", "test_byobnet",
                                  pytest.param("ghostnet_050", marks=pytest.mark.slow),
                                  pytest.param("rexnet_100", marks=pytest.mark.slow)])
def test_feature_getter_torchscript(arch):
    """timm's check (test_feature_getter_stage_ends_torchscript): ``FeatureGetterNet`` over the ensemble scripts and
    gives its eager levels; scripting leaves the eager model working on per-member views."""
    from timm.models._features import FeatureGetterNet
    model, x = _create(arch).eval(), torch.randn(1, 3, 96, 96)
    try:
        torch.jit.script(FeatureGetterNet(_create(arch, split=False).eval(), out_indices=(0, 1, 2)))
    except Exception as e:
        pytest.skip(f"the base {arch}'s getter does not script: {type(e).__name__}")
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(0, 1, 2), intermediates_only=True)
        getter = FeatureGetterNet(model, out_indices=(0, 1, 2)).eval()
        torch.testing.assert_close(getter(x), expected)
        scripted = torch.jit.script(getter)
        torch.testing.assert_close(scripted(x), expected)
        final, levels = torch.jit.script(model).forward_intermediates(x)
        want_final, want_levels = model.forward_intermediates(x)
        torch.testing.assert_close(final, want_final)
        torch.testing.assert_close(levels, want_levels)
        views = torch.stack([x, x.flip(-1)])
        assert isinstance(getter.model, type(model)) and getter.model.members is model.members
        kw = dict(indices=(0, 1, 2), intermediates_only=True)
        torch.testing.assert_close(getter.model.forward_intermediates(views, **kw),
                                   model.forward_intermediates(views, **kw))


@pytest.mark.timeout(300)
def test_set_input_size_resizes_every_member():
    """timm's ``set_input_size`` (ViT/Swin): the ensemble resizes each member, as the base model resizes itself."""
    model, base = _create("test_vit").eval(), _create("test_vit", split=False).eval()
    model.set_input_size(img_size=64)
    base.set_input_size(img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        want = torch.stack([m(x) for m in model.members]).mean(0)
    assert torch.allclose(out, want, atol=1e-6) and out.shape == base(x).shape
    assert all(m.patch_embed.img_size == base.patch_embed.img_size for m in model.members)
    assert not hasattr(_create("test_resnet"), "set_input_size")  # as the base: timm's code asks with hasattr


@pytest.mark.timeout(300)
def test_jit_trace_runs_at_another_batch_size():
    """``torch.jit.trace`` (legacy ONNX export): the ensemble traces and the trace runs at another batch size."""
    model = _create("test_resnet").eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, TARGET, TARGET), check_trace=False)
    x = torch.randn(3, 3, TARGET, TARGET)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_head_hidden_size_of_an_unpooled_model_is_its_channels():
    """A model created with ``global_pool=''`` has pre-logits ``[B, C, H, W]``: the ensemble's ``head_hidden_size``
    is S x a member's C, and ``forward_head(pre_logits=True)`` puts the members side by side on C (it concatenated
    on the last dim, the width). The width probe read the last dim (the feature map's width: 5 for test_resnet at its
    size), so a classifier made after a prune or ``reset_classifier`` took that many inputs (ghostnet_050 in
    timm's ``test_head_hidden_size``: ``mat1 and mat2 shapes cannot be multiplied (2x24 and 14x7)``)."""
    ens = timm_split.split(timm.create_model("test_resnet", num_classes=0, global_pool=""), 2).eval()
    member = ens.members[0]
    assert member.head_hidden_size == member.num_features < 96 and ens.head_hidden_size == 2 * member.num_features
    with torch.no_grad():
        pre = ens.forward_head(ens.forward_features(torch.randn(2, 3, 64, 64)), pre_logits=True)
        assert pre.shape[1] == ens.head_hidden_size
        ens.reset_classifier(7, "avg")
        assert ens(torch.randn(2, 3, 64, 64)).shape == (2, 7)
