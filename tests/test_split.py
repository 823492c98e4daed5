"""The split engine on the acceptance list (issue 2) and its contract."""
import math

import pytest
import timm
from timm.layers import EvoNorm2dS0a
import torch
from torch import nn

import timm_split
from timm_split import SplitError

from conftest import ACCEPTANCE, assert_unchanged, snapshot

NUM_CLASSES = 10


def _create(name, device="cpu"):
    kwargs, size = ACCEPTANCE[name]
    with torch.device(device):
        model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    return model, size


@pytest.mark.tier
@pytest.mark.timeout(180)
@pytest.mark.parametrize("split_factor", [2, 4])
@pytest.mark.parametrize("name", list(ACCEPTANCE))
def test_cpu_forward_backward(name, split_factor):
    """On CPU at a small size: [B, num_classes] out, a grad on every parameter, the input model unchanged.
    (Meta parity of the acceptance list is in tests/test_zoo.py's parity tier.)"""
    model, size = _create(name)
    model.train()
    snap = snapshot(model)
    ens = timm_split.split(model, split_factor, img_size=size)
    assert_unchanged(model, snap)
    assert ens.training
    x = torch.randn(2, 3, size, size)
    out = ens(x)
    assert out.shape == (2, NUM_CLASSES)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in ens.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert_unchanged(model, snap)


def test_split_one_is_exact_copy():
    model = timm.create_model("resnet18", num_classes=7).eval()
    ens = timm_split.split(model, 1)
    x = torch.randn(2, 3, 64, 64)
    assert ens.members[0] is not model
    with torch.no_grad():
        assert torch.equal(ens(x), model(x))
        assert torch.equal(ens.forward_members(x)[0], model(x))


def test_members_seeded_and_distinct():
    model = timm.create_model("resnet18", num_classes=5)
    a = timm_split.split(model, 2, seed=3)
    b = timm_split.split(model, 2, seed=3)
    c = timm_split.split(model, 2, seed=4)
    wa = [m.conv1.weight for m in a.members]
    assert torch.equal(wa[0], b.members[0].conv1.weight) and torch.equal(wa[1], b.members[1].conv1.weight)
    assert not torch.equal(wa[0], wa[1])
    assert not torch.equal(wa[0], c.members[0].conv1.weight)
    rng = torch.get_rng_state()
    timm_split.split(model, 2)
    assert torch.equal(rng, torch.get_rng_state()), "split() must not consume the global RNG"


def test_init_follows_family():
    """Zero-init of the last BN gamma survives in ResNet members; ViT members keep trunc-normal 0.02."""
    res = timm_split.split(timm.create_model("resnet50"), 2)
    for m in res.members:
        assert torch.count_nonzero(m.layer1[0].bn3.weight) == 0
        assert torch.all(m.layer1[0].bn1.weight == 1)
    vit = timm_split.split(timm.create_model("vit_small_patch16_224"), 2)
    std = vit.members[0].blocks[0].mlp.fc1.weight.std().item()
    assert 0.015 < std < 0.025, std


@pytest.mark.timeout(120)
def test_planner_moves_three_families_where_two_are_not_enough():
    """gMixer at S=4: token-mixing weights do not shrink with the width, and parity needs the embedding, the
    token MLP and the channel MLP to move three different ways (two-family moves stopped at params 1.020,
    MACs 0.912)."""
    with torch.device("meta"):
        model = timm.create_model("gmixer_12_224", num_classes=1000)
    plan = timm_split.plan_split(model, 4)
    assert abs(plan.params_ratio - 1) <= 0.02 and abs(plan.macs_ratio - 1) <= 0.04, plan


@pytest.mark.timeout(120)
def test_keyword_tables_do_not_couple_widths():
    """EVA-02 passes its rotary table to each attention as ``rope=``. The module call records it (the attribute
    settler needs it), but sizes are coupled to positional inputs only: coupling to the table, whose sizes equal
    head_dim, fixed the widths of eva02_tiny_patch14_336 at S=4 (params 1.571, MACs 2.280)."""
    with torch.device("meta"):
        model = timm.create_model("eva02_tiny_patch14_336", num_classes=1000)
    ens = timm_split.split(model, 4)
    plan = ens.split_plan
    assert abs(plan.params_ratio - 1) <= 0.02 and abs(plan.macs_ratio - 1) <= 0.04, plan


@pytest.mark.timeout(120)
def test_attribute_settler_gets_keyword_arguments():
    """DINOv3's attention gets its rotary table as ``rope=``. Run without it, every head count fits, and the
    settler kept 12 of 16 heads against a table planned for 16 (the member then failed to run)."""
    with torch.device("meta"):
        model = timm.create_model("vit_large_patch16_dinov3", num_classes=1000)
    plan = timm_split.split(model, 2).split_plan
    assert ("blocks.0.attn", "num_heads", 16, 12) not in plan.attributes
    assert abs(plan.params_ratio - 1) <= 0.02 and abs(plan.macs_ratio - 1) <= 0.04, plan


def test_plan_is_printable_and_consistent():
    model = timm.create_model("resnet50", num_classes=100)
    ens = timm_split.split(model, 4, plan_at="model")  # parity at this head (the default plans at the cfg's)
    plan = ens.split_plan
    text = str(plan)
    assert "SplitPlan: resnet50 -> 4 members" in text and "layer4.0.conv3.weight[0]" in text
    with pytest.raises(dataclasses_frozen()):
        plan.split_factor = 3
    for g in plan.groups:
        assert g.new % g.divisor == 0 and g.new >= g.divisor
    real = sum(p.numel() for p in ens.parameters())
    assert plan.params[1] == real
    assert abs(plan.params_ratio - 1) <= 0.02 and abs(plan.macs_ratio - 1) <= 0.04
    # width attributes follow the new shapes
    m = ens.members[0]
    assert m.fc.in_features == m.fc.weight.shape[1] == m.num_features
    assert ens.num_features == 4 * m.num_features


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_attention_attributes_consistent():
    ens = timm_split.split(timm.create_model("vit_small_patch16_224", img_size=64), 2, img_size=64)
    attn = ens.members[0].blocks[0].attn
    assert attn.num_heads == 6, "heads stay, head_dim shrinks"
    assert attn.head_dim * attn.num_heads == attn.qkv.weight.shape[0] // 3
    assert math.isclose(attn.scale, attn.head_dim ** -0.5)
    assert ens.members[0].embed_dim == ens.members[0].cls_token.shape[-1]


def test_regularization_scaled():
    model = timm.create_model("resnet50", drop_rate=0.4, drop_path_rate=0.2)
    ens = timm_split.split(model, 4)
    m = ens.members[0]
    assert math.isclose(m.drop_rate, 0.1)
    assert math.isclose(m.layer4[2].drop_path.drop_prob, model.layer4[2].drop_path.drop_prob / 4)
    assert model.drop_rate == 0.4
    kept = timm_split.split(model, 4, scale_regularization=False)
    assert kept.members[0].drop_rate == 0.4
    assert "drop_rate 0.4->0.1" in str(ens.split_plan)
    assert math.isclose(timm_split.scaled_weight_decay(1e-4, 4), 1e-4 * math.exp(0.25 - 1))


@pytest.mark.parametrize("drop_scale,div", [("S", 4.0), ("sqrt", 2.0)])
def test_drop_scale_divides_every_rate(drop_scale, div):
    """The seed divides by S for ResNets and by sqrt(S) for SE-ResNet/EfficientNet/PyramidNet/DenseNet."""
    with torch.device("meta"):
        model = timm.create_model("efficientnet_b0", drop_rate=0.3, drop_path_rate=0.2)
        ens = timm_split.split(model, 4, drop_scale=drop_scale)
    old = {f"{p}.{a}": v for p, m in model.named_modules() for a, v in vars(m).items()
           if a in ("drop_rate", "drop_prob", "p") and isinstance(v, float) and v > 0}
    new = {f"{p}.{a}": getattr(m, a) for p, m in ens.members[0].named_modules() for a in ("drop_rate", "drop_prob", "p")
           if f"{p}.{a}" in old}
    assert len(old) > 10 and new.keys() == old.keys()
    for k, v in old.items():
        assert math.isclose(new[k], v / div), k
    assert ens.split_plan.drop_divisor == div
    assert f"dropout / drop-path rates divided by {div:g}" in str(ens.split_plan)
    with pytest.raises(ValueError, match="drop_scale must be one of"):
        timm_split.split(model, 2, drop_scale="S/2")


def test_views_and_averaging():
    model = timm.create_model("resnet18", num_classes=4).eval()
    ens = timm_split.split(model, 2).eval()
    x = torch.randn(2, 3, 32, 32)
    views = torch.stack([x, x.flip(-1)])
    with torch.no_grad():
        per = ens.forward_members(views)
        assert per.shape == (2, 2, 4)
        assert torch.allclose(per[1], ens.members[1](x.flip(-1)))
        assert torch.allclose(ens.forward_members([x, x.flip(-1)]), per)
        assert torch.allclose(ens(x), ens.forward_members(x).mean(0))
        feats = ens.forward_features(x)
        assert torch.allclose(ens.forward_head(feats), ens(x), atol=1e-6)
        assert ens.forward_head(feats, pre_logits=True).shape == (2, ens.num_features)
        probs = timm_split.split(model, 2, averaging="probs").eval()
        lp = probs(x)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="3 views for 2 members"):
        ens.forward_members([x, x, x])
    with pytest.raises(ValueError, match="averaging"):
        timm_split.split(model, 2, averaging="median")


def test_timm_surface():
    model = timm.create_model("resnet50", num_classes=100)
    ens = timm_split.split(model, 2)
    cfg = ens.pretrained_cfg
    assert cfg["architecture"] == "splitnet_resnet50" and cfg["split_factor"] == 2
    assert cfg["input_size"] == model.pretrained_cfg["input_size"] and cfg["mean"] == model.pretrained_cfg["mean"]
    assert ens.default_cfg is ens.pretrained_cfg
    assert ens.num_classes == 100
    assert len(ens.get_classifier()) == 2
    ens.reset_classifier(5)
    assert ens.num_classes == 5 and ens(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    ens.set_grad_checkpointing(True)
    assert all(m.grad_checkpointing for m in ens.members)
    assert model.num_classes == 100


def test_plain_torch_model():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, padding=1, groups=32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(64, 10))
    ens = timm_split.split(net, 2, img_size=16)
    out = ens(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 10)
    m = ens.members[0]
    assert m[3].groups == m[0].out_channels == m[3].in_channels < 32, "depthwise keeps in == out == groups"
    assert ens.pretrained_cfg["architecture"] == "splitnet_Sequential"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_bad_split_factor(bad):
    with pytest.raises(ValueError, match="split_factor must be an int >= 1"):
        timm_split.split(timm.create_model("resnet18"), bad)


def test_split_factor_too_large_names_group():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    with pytest.raises(ValueError, match=r"too large: channel group '0\.weight\[0\]' of width 4"):
        timm_split.split(net, 100, img_size=8)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean().item() > 0:  # data-dependent: cannot be traced on meta
            y = y * 2
        return y.mean((2, 3))


def _global_module_hooks():
    mod = torch.nn.modules.module
    return {k: dict(v) for k, v in vars(mod).items() if k.startswith("_global_") and isinstance(v, dict)}


def test_untraceable_model_raises_split_error():
    before = _global_module_hooks()
    with pytest.raises(SplitError, match="meta device in module ''.*item"):
        timm_split.split(_DataDependent(), 2, img_size=8)
    assert _global_module_hooks() == before


def test_split_leaves_no_global_hooks():
    """The tracer's global module hooks are gone afterwards, with_kwargs flag included (torch's handle leaves
    that entry behind, and torch.compile then warns about global hooks for the rest of the process)."""
    before = _global_module_hooks()
    timm_split.split(timm.create_model("resnet18", pretrained=False), 2, img_size=32)
    assert _global_module_hooks() == before


def test_headless_model_concatenates_features():
    """num_classes=0: the output is pooled features, so its width scales and the members' features are joined."""
    model = timm.create_model("resnet18", num_classes=0)
    ens = timm_split.split(model, 2)
    x = torch.randn(2, 3, 64, 64)
    feats = ens(x)
    width = ens.members[0].num_features
    assert width < model.num_features and feats.shape == (2, 2 * width) == (2, ens.num_features)
    torch.testing.assert_close(feats, ens.forward_head(ens.forward_features(x), pre_logits=True))
    torch.testing.assert_close(feats[:, width:], ens.members[1](x))
    ens.reset_classifier(7)
    assert ens(x).shape == (2, 7)
    assert model.num_classes == 0 and model.num_features == 512


class _MixedConv(nn.Module):
    """Channel split sizes held in a list attribute (MixNet's MixedConv2d)."""

    def __init__(self, c=48):
        super().__init__()
        self.splits = [c // 2, c // 4, c // 4]
        self.convs = nn.ModuleList(nn.Conv2d(s, s, k, padding=k // 2, groups=s) for s, k in zip(self.splits, (3, 5, 7)))

    def forward(self, x):
        return torch.cat([conv(t) for conv, t in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class _HeadsSharingOneWidth(nn.Module):
    """Per-head projections whose value width is one attribute (EfficientViT-M's cascaded attention)."""

    def __init__(self, c=128, heads=2, key_dim=16, val_dim=64):
        super().__init__()
        self.key_dim, self.val_dim = key_dim, val_dim
        self.qkvs = nn.ModuleList(nn.Conv2d(c, 2 * key_dim + val_dim, 1) for _ in range(heads))
        self.proj = nn.Conv2d(heads * val_dim, c, 1)

    def forward(self, x):
        outs = []
        for qkv in self.qkvs:
            q, k, v = qkv(x).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)
            outs.append((v.flatten(2) @ attn.transpose(1, 2)).view(x.shape[0], self.val_dim, *x.shape[2:]))
        return self.proj(torch.cat(outs, 1))


class _Rotary(nn.Module):
    """Keeps ``dim`` and a buffer of ``dim // 4`` frequencies (timm's RotaryEmbeddingDinoV3)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.register_buffer("periods", torch.arange(1, dim // 4 + 1, dtype=torch.float32), persistent=False)

    def get_embed(self, n):
        assert self.periods.numel() == self.dim // 4
        ang = torch.arange(n, dtype=torch.float32, device=self.periods.device)[:, None] / self.periods
        return ang.repeat(1, 4)  # [n, dim]


class _RopeAttention(nn.Module):
    def __init__(self, c=64, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.rope = _Rotary(c // heads)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rot = self.rope.get_embed(N)
        q, k = q * rot.cos(), k * rot.cos()
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


def _tokens(block, c):
    return nn.Sequential(nn.Conv2d(3, c, 4, 4), nn.Flatten(2), _Transpose(), block, _Mean(), nn.Linear(c, 10))


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(1)


@pytest.mark.parametrize("net", [
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 48, 1), _MixedConv(48), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(48, 10)), id="split-sizes-list"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 128, 1), _HeadsSharingOneWidth(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(128, 10)), id="one-width-for-all-heads"),
    pytest.param(lambda: _tokens(_RopeAttention(64), 64), id="rotary-dim-and-buffer"),
    pytest.param(lambda: nn.Sequential(  # EvoNorm's group std: x.var(keepdim=True) expanded back to x.shape
        nn.Conv2d(3, 128, 3, padding=1), EvoNorm2dS0a(128, group_size=16),
        nn.Conv2d(128, 256, 3, padding=1, groups=8), EvoNorm2dS0a(256, group_size=16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)), id="group-statistic-expanded-back"),
])
def test_width_attribute_rules(net):
    """Widths held in attributes the layer types do not name: split-size lists, one attribute shared by the
    groups of several heads (tied and re-planned), a size kept as a multiple of a buffer's width, a group count
    of a norm whose statistic is broadcast back over the channels it reduced."""
    ens = timm_split.split(net(), 4, img_size=16)
    assert ens(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    p = ens.split_plan
    assert abs(p.params_ratio - 1) < 0.1 and abs(p.macs_ratio - 1) < 0.15, (p.params_ratio, p.macs_ratio)
    changed = {(path.rsplit(".", 1)[-1], attr) for path, attr, old, new in p.attributes if new != old}
    rules = {("1", "splits"), ("1", "val_dim"), ("rope", "dim"), ("3", "groups")}
    assert changed & rules, changed


@pytest.mark.parametrize("kind, kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("LSTM", dict(proj_size=3)),
    ("GRU", dict(num_layers=2, batch_first=True)),
    ("RNN", dict(bidirectional=True, nonlinearity="relu")),
])
def test_recurrent_ops_on_meta_from_shapes(kind, kwargs):
    """On meta, whole-sequence LSTM/GRU/RNN calls take their output shapes from the weights (aten would run
    one cell per time step); a weight that does not fit the input falls through to the op, which raises."""
    from timm_split.trace import MetaRecurrent, recurrent_meta_output

    rnn = getattr(nn, kind)(5, 7, **kwargs)
    x = torch.randn(4, 9, 5)
    want = rnn(x)
    with torch.device("meta"):
        meta = getattr(nn, kind)(5, 7, **kwargs)
    assert recurrent_meta_output(torch.lstm, (x,)) is None  # not a whole-sequence call on meta
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with MetaRecurrent(), Ops() as ops:
        got = meta(x.to("meta"))
    assert not {"mm", "addmm", "matmul", "linear"} & ops.seen, ops.seen  # no cell ran
    flat = lambda o: [t for t in torch.utils._pytree.tree_flatten(o)[0] if isinstance(t, torch.Tensor)]  # noqa: E731
    assert [t.shape for t in flat(got)] == [t.shape for t in flat(want)]
    with torch.device("meta"):
        wrong = getattr(nn, kind)(6, 7, **kwargs)  # expects 6 input features, gets 5
    with pytest.raises(RuntimeError), MetaRecurrent():
        wrong(x.to("meta"))


def test_ambiguous_attributes_varied_only_where_read():
    """fit_module varies only the attributes a forward reads: 3 forwards here, not 7."""
    from timm_split.engine.attributes import fit_module

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.width, self.unused, self.calls = 8, 8, 0

        def forward(self, x):
            self.calls += 1
            return x.reshape(x.shape[0], self.width, -1)

    mod = Reads()
    entries = [("width", 8, (2, 4, 8)), ("unused", 8, (4, 6, 8))]
    fit = fit_module(mod, entries, [torch.empty(2, 32, device="meta")], {}, [(2, 8, 4)], max_tries=64)
    assert fit == (8, 4) and mod.calls == 3
    assert type(mod) is Reads
    assert fit_module(mod, entries, [torch.empty(2, 32, device="meta")], {}, [(2, 3, 4)], max_tries=64) is None


@pytest.mark.timeout(120)
def test_user_forward_hooks_are_not_traced_or_copied():
    """A user's hook that needs real values (float() of an output) does not break split(), keeps running on the
    original, and is not carried into members built for other widths."""
    model = timm.create_model("resnet18", num_classes=NUM_CLASSES).eval()
    seen = []
    model.layer1.register_forward_hook(lambda mod, args, out: seen.append(float(out.abs().mean())))
    model.fc.register_forward_pre_hook(lambda mod, args: seen.append(float(args[0].sum())))
    snap = snapshot(model)
    ens = timm_split.split(model, 2, img_size=32)
    assert_unchanged(model, snap)
    assert not seen, "a user hook ran during split()"
    one = timm_split.split(model, 1)
    with torch.no_grad():
        ens(torch.randn(1, 3, 32, 32))
        one(torch.randn(1, 3, 32, 32))
        assert not seen, "a member carries the user's hook"
        model(torch.randn(1, 3, 32, 32))
    assert len(seen) == 2, "the original keeps its hooks"


@pytest.mark.timeout(120)
def test_traced_at_the_size_the_model_was_created_at():
    """``create_model(..., img_size=64)`` is split at 64 without repeating img_size (its cfg still says 224)."""
    model = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=NUM_CLASSES)
    assert model.pretrained_cfg["input_size"][-1] == 224
    ens = timm_split.split(model, 2)
    assert ens.split_plan.input_size == (3, 64, 64)
    with torch.no_grad():
        assert ens(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


class _SeqNet(nn.Module):
    """An LSTM over the rows of a conv feature map (sequencer2d's pattern), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.rnn(y)[0].mean(1))


def test_member_lstm_flat_weights_are_its_parameters():
    """nn.LSTM caches its weights in ``_flat_weights``, which TorchScript reads: every member's cache holds that
    member's own parameters (not the meta template's), so a scripted split computes what the eager one does."""
    ens = timm_split.split(_SeqNet().eval(), 2, img_size=8)
    for m in ens.members:
        assert all(w is getattr(m.rnn, n) for w, n in zip(m.rnn._flat_weights, m.rnn._flat_weights_names))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(ens)(x), ens(x))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "efficientvit_m0", "maxvit_pico_rw_256"])
def test_patch_geometry_is_not_a_width(arch):
    """A patch grid, patch or image size that equals a width by value (EVA-02's 16 x 16 grid beside 16 RoPE bands,
    EfficientViT's patch of 16, MaxViT's 256 px) is geometry: every member keeps the base's (timm's checkpoint
    filters resample position tables to the member's grid)."""
    import timm
    with torch.device("meta"):
        base = timm.create_model(arch)
        ens = timm_split.split(base, 2)
    names = ("img_size", "grid_size", "patch_size", "num_patches")
    want = {(p, n): getattr(m, n) for p, m in base.named_modules() for n in names if n in vars(m)}
    assert want
    for member in ens.members:
        mods = dict(member.named_modules())
        assert {(p, n): getattr(mods[p], n) for p, n in want} == want
