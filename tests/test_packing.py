"""The packing pass (issue 16): S members run as one packed network give the loop's outputs, gradients and
buffers, for every model family, and say which ops they could not pack."""
import copy
import logging
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_split
from timm_split.execution.packed import CudaGraphed, PackedExecution, pack_members

aten = torch.ops.aten
CLASSES = 5
DEVICE = os.environ.get("PACKING_DEVICE", "cpu")  # benchmarks/gpu_speed.sh runs the families test on cuda


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads, tf32 = torch.get_num_threads(), torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # on a GPU: TF32 convolutions differ from fp32 by ~1e-3
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.allow_tf32 = tf32


def _close(a, b, what, tol=1e-4):
    """Equal up to float noise, relative to the largest magnitude."""
    err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
    assert err <= tol * scale + 1e-6, f"{what}: max error {err:.3g}, max magnitude {scale:.3g}"


def _no_dropout(model):
    for m in model.modules():
        for attr, val in list(vars(m).items()):
            if isinstance(val, float) and (attr == "p" and isinstance(m, nn.modules.dropout._DropoutNd)
                                           or "drop" in attr):
                setattr(m, attr, 0.0)
    return model


def _split(model, size, S=2):
    ens = timm_split.split(_no_dropout(model), S, img_size=size)
    with torch.no_grad():  # zero-initialised heads and layer scales would make the comparison trivial
        for p in ens.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ens


def _assert_like_loop(ens, x, train, tol=1e-4):
    """Packed vs loop: outputs, and in training the gradients of every parameter and the updated buffers (to
    ``tol`` of the largest magnitude)."""
    ens.train(train)
    ref = copy.deepcopy(ens)
    packed = pack_members(ens.members)
    out, want = packed(x), ref.forward_members(x)
    _close(out, want, "output", tol)
    if not train:
        return packed
    w = torch.randn(want.shape, device=want.device)
    (out * w).sum().backward()
    (want * w).sum().backward()
    scale = max(q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None)
    for (name, p), q in zip(ens.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert (p.grad - q.grad).abs().max().item() <= tol * scale, f"gradient of {name}"
    for (name, b), c in zip(ens.named_buffers(), ref.buffers()):
        _close(b, c, f"buffer {name}", tol)
    return packed


def _small_resnet():
    from timm.models.resnet import Bottleneck, ResNet
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, stem_width=16, channels=(8, 16, 32, 64))


def _small_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=CLASSES)


def _small_swin():
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2),
                           num_classes=CLASSES)


FAMILIES = {
    "resnet": (_small_resnet, 32),
    "efficientnet": (lambda: timm.create_model("efficientnet_b0", num_classes=CLASSES), 64),
    "mobilenetv3": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=CLASSES), 64),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=CLASSES), 32),
    "regnet": (lambda: timm.create_model("regnetx_002", num_classes=CLASSES), 32),
    "vit": (_small_vit, 32),
    "deit": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=CLASSES), 32),
    "swin": (_small_swin, 32),
    "mixer": (lambda: timm.create_model("mixer_s16_224", img_size=32, num_classes=CLASSES), 32),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_pack_exactly(family):
    """Every family packs with no op left to a per-member loop, and matches the loop in eval (one batch) and in
    training (per-member views: outputs, gradients, BatchNorm running stats)."""
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    ens = _split(build(), size)
    # BatchNorm in training over a few 1x1 or 2x2 maps amplifies float noise: enough samples to stay near 1e-6
    B = 4 if family in ("efficientnet", "mobilenetv3", "regnet") else 2
    with torch.no_grad():
        packed = _assert_like_loop(ens, torch.randn(B, 3, size, size, device=DEVICE), train=False)
    # training in float64: exact up to 1e-9 (in float32 BatchNorm's backward over tiny maps leaves ~1e-4 noise)
    _assert_like_loop(ens.double(), torch.randn(2, B, 3, size, size, device=DEVICE, dtype=torch.float64), train=True,
                      tol=1e-9)
    assert packed.looped_ops == []


def _targets(program, op):
    return [n for n in program.module.graph.nodes if n.op == "call_function" and n.target == op]


@pytest.mark.timeout(120)
def test_packed_graph_is_one_wide_network():
    """The packed graph of a ViT has one attention call per block, with the S members' heads side by side in
    its batch, one batched matmul per linear layer, and no op looped per member."""
    torch.manual_seed(0)
    S, B = 3, 2
    ens = _split(_small_vit(), 32, S=S)
    member = ens.members[0]
    program = pack_members(ens.members).program(torch.randn(B, 3, 32, 32))
    attn = _targets(program, aten.scaled_dot_product_attention.default)
    assert len(attn) == len(member.blocks)
    q = attn[0].args[0].meta["val"]
    heads = member.blocks[0].attn.num_heads
    assert q.shape[0] * q.shape[1] == S * B * heads
    linears = sum(isinstance(m, nn.Linear) for m in member.modules())
    assert len(_targets(program, aten.baddbmm.default)) == linears
    assert len(_targets(program, aten.addmm.default)) == 0 and program.looped_ops == []


@pytest.mark.timeout(120)
def test_packed_convs_are_grouped():
    """Each member conv becomes one conv with S times the groups and channels."""
    torch.manual_seed(0)
    ens = _split(_small_resnet(), 32, S=4)
    program = pack_members(ens.members).program(torch.randn(2, 3, 32, 32))
    convs = _targets(program, aten.convolution.default)
    member_convs = [m for m in ens.members[0].modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(member_convs)
    assert sorted(n.args[-1] for n in convs) == sorted(4 * m.groups for m in member_convs)
    assert sorted(n.meta["val"].shape[1] for n in convs) == sorted(4 * m.out_channels for m in member_convs)


class _Lookup(nn.Module):
    """A layer whose op (an embedding lookup) has no packing rule."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.table = nn.Parameter(torch.randn(channels, 1))
        self.register_buffer("idx", torch.arange(channels))

    def forward(self, x):
        return self.conv(x) * F.embedding(self.idx, self.table).view(1, -1, 1, 1)


def test_op_without_rule_is_named_or_run_per_member():
    """strict=True raises a ValueError naming the op and its module; by default the op runs once per member
    inside the packed graph (listed in looped_ops) and the result is still the loop's."""
    torch.manual_seed(0)
    members = nn.ModuleList([_Lookup(), _Lookup()])
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"aten\.embedding.*module '<root>'"):
        pack_members(members, strict=True).program(x)
    packed = pack_members(members)
    out = packed(x)
    _close(out, torch.stack([m(x) for m in members]), "output")
    assert any("aten.embedding" in op for op in packed.looped_ops)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_unrecordable_member_falls_back_to_loop(caplog):
    """A forward that cannot be recorded (data-dependent control flow) runs as the loop, with a warning."""
    members = nn.ModuleList([_DataDependent(), _DataDependent()])
    x = torch.rand(2, 4)
    with caplog.at_level(logging.WARNING, logger="timm_split.execution.packed"):
        out = PackedExecution().run(members, [x, x])
    assert "running the loop" in caplog.text
    _close(out, torch.stack([m(x) for m in members]), "output")


@pytest.mark.timeout(120)
def test_cached_packed_tensors_follow_updates():
    """Without autograd the packed tensors are cached; an optimizer step on a member invalidates them."""
    torch.manual_seed(0)
    ens = _split(_small_vit(), 32).eval()
    ex, x = PackedExecution(), torch.randn(2, 3, 32, 32)
    views = [x] * 2
    with torch.no_grad():
        first = ex.run(ens.members, views)
        ens.members[1].head.weight.add_(1.0)  # what an optimizer step does: an in-place update
        _close(ex.run(ens.members, views), ens.forward_members(x), "after an update")
    assert not torch.allclose(first[1], ens.forward_members(x)[1])


@pytest.mark.timeout(120)
def test_channels_last_and_bf16_autocast():
    """Channels-last packing is exact; under bf16 autocast packed and loop agree to bf16 precision."""
    torch.manual_seed(0)
    ens = _split(timm.create_model("convnext_atto", num_classes=CLASSES), 32).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ens.forward_members(x)
        _close(pack_members(ens.members, channels_last=True)(x), want, "channels-last")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, ref = pack_members(ens.members)(x), ens.forward_members(x)
    assert got.dtype == ref.dtype
    _close(got, ref, "bf16", tol=3e-2)


def test_bad_options_and_cpu_graphs():
    with pytest.raises(ValueError, match="strict must be True or False"):
        PackedExecution(strict="yes")
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        CudaGraphed(lambda t: t * 2, [torch.zeros(2)])


class _ManyOps(nn.Module):
    """Ops the families above use rarely: windows, index tables, pads, resizes, reductions along any dim."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.gn = nn.GroupNorm(2, c)
        self.table = nn.Parameter(torch.randn(7, c))
        self.register_buffer("index", torch.tensor([0, 3, 6, 2]))
        self.scale = nn.Parameter(torch.randn(()))

    def forward(self, x):
        y = self.gn(self.conv(x))                                         # [B, C, H, W]
        y = y + self.table[self.index].sum(0)[None, :, None, None]        # index with a shared table index
        w = y.unfold(2, 2, 2).mean(-1)                                    # windows along H
        z = F.interpolate(F.pad(w, (1, 1)), size=(4, 4), mode="bilinear", align_corners=False)
        z = F.pixel_shuffle(torch.cat([z, z.flip(1), z.roll(1, 2), z.cumsum(3)], 1), 2)
        a, b = z.chunk(2, dim=1)
        s = torch.stack([a.amax(dim=(2, 3)), b.softmax(dim=1).sum(dim=(2, 3))], -1)
        return s.flatten(1) * self.scale.exp() + z.var(dim=(1, 2, 3)).unsqueeze(1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("views", [False, True])
def test_many_ops_pack_exactly(views):
    """Members that are not from a split (any S modules of one architecture): forward and gradients."""
    torch.manual_seed(0)
    members = nn.ModuleList([_ManyOps() for _ in range(3)])
    ref = copy.deepcopy(members)
    x = torch.randn(3, 2, 3, 8, 8) if views else torch.randn(2, 3, 8, 8)
    packed = pack_members(members)
    out = packed(x)
    want = torch.stack([m(v) for m, v in zip(ref, x if views else [x] * 3)])
    _close(out, want, "output")
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(members.named_parameters(), ref.parameters()):
        _close(p.grad, q.grad, f"gradient of {name}")
    assert packed.looped_ops == []


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0].mean(1))


def test_recurrent_op_runs_per_member():
    """A whole-sequence LSTM (sequencer2d) is recorded as one op and run once per member; the rest is packed."""
    torch.manual_seed(0)
    members = nn.ModuleList([_Recurrent(), _Recurrent()])
    x = torch.randn(2, 5, 4)
    packed = pack_members(members)
    out = packed(x)
    want = torch.stack([m(x) for m in members])
    _close(out, want, "output")
    out.sum().backward()
    assert all(p.grad is not None for p in members.parameters())
    assert packed.looped_ops == ["torch.lstm (lstm)"]
