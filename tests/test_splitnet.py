"""timm integration (issue 4): the registry, cfgs, checkpoints and the inherit warm start."""
import pytest
import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

import timm_split
from conftest import tier_params


def test_registered_like_timm():
    names = timm.list_models("splitnet_*")
    assert len(names) == len([n for n in timm.list_models() if not n.startswith("splitnet_")])
    assert {"splitnet_resnet50", "splitnet_vit_small_patch16_224", "splitnet_convnext_tiny",
            "splitnet_efficientnet_b0"} <= set(names)
    assert timm.is_model("splitnet_resnet50") and timm.is_model("splitnet_regnety_016")
    assert "splitnet" in timm.list_modules()


def test_create_passes_timm_kwargs_and_defaults_to_two():
    m = timm.create_model("splitnet_resnet50", num_classes=7, drop_rate=0.2)
    assert isinstance(m, timm_split.SplitEnsemble) and m.split_factor == 2
    assert m.num_classes == 7 and abs(m.members[0].drop_rate - 0.1) < 1e-9
    v = timm.create_model("splitnet_vit_small_patch16_224", split_factor=4, img_size=64, in_chans=1, num_classes=3)
    assert v.split_factor == 4
    assert v(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_pretrained_cfg_is_true():
    m = timm.create_model("splitnet_convnext_tiny", split_factor=4, num_classes=10)
    cfg = m.pretrained_cfg
    base = timm.create_model("convnext_tiny", pretrained=False).pretrained_cfg
    assert cfg["architecture"] == "splitnet_convnext_tiny" and cfg["split_factor"] == 4
    for k in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        assert cfg[k] == base[k], k
    assert cfg["num_classes"] == 10
    assert cfg["classifier"] == tuple(f"members.{i}.head.fc" for i in range(4))
    data_cfg = timm.data.resolve_data_config({}, model=m)
    assert data_cfg["input_size"] == base["input_size"] and data_cfg["crop_pct"] == base["crop_pct"]
    tf = timm.data.create_transform(**data_cfg)
    from PIL import Image
    assert tf(Image.new("RGB", (300, 260))).shape == base["input_size"]


def test_checkpoint_roundtrip(tmp_path):
    m = timm.create_model("splitnet_resnet18", num_classes=5)
    path = tmp_path / "model.safetensors"
    timm_split.save_checkpoint(m, path)
    x = torch.randn(2, 3, 32, 32)
    # timm's own loader, into a differently seeded model
    other = timm.create_model("splitnet_resnet18", num_classes=5, seed=7)
    assert not torch.equal(other.members[0].conv1.weight, m.members[0].conv1.weight)
    timm.models.load_checkpoint(other, str(path))
    # timm's pretrained convention with a local file; the file's head is kept when the overlay says its classes
    loaded = timm.create_model("splitnet_resnet18", pretrained=True, num_classes=5,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    m.eval(), other.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(m(x), other(x)) and torch.equal(m(x), loaded(x))
    # state_dict round-trips in memory too
    again = timm.create_model("splitnet_resnet18", num_classes=5, seed=3)
    again.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_checkpoint_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    timm_split.save_checkpoint(timm.create_model("splitnet_resnet18", num_classes=5), path)
    with pytest.raises(ValueError, match="no hub weights.*pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("splitnet_resnet18", pretrained=True)
    with pytest.raises(ValueError, match="checkpoint has 2 members but .* split_factor=4"):
        timm_split.load_checkpoint(timm.create_model("splitnet_resnet18", split_factor=4, num_classes=5), path)
    with pytest.raises(ValueError, match="does not match splitnet_resnet34 .*shape mismatches|unexpected keys"):
        timm_split.load_checkpoint(timm.create_model("splitnet_resnet34", num_classes=5), path)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        timm_split.save_checkpoint(timm.create_model("splitnet_resnet18"), tmp_path / "model.pth")


def _task(n=256, seed=0):
    protos = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))  # classes differ in colour
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return protos[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g), y


class _Net(nn.Module):
    def __init__(self, w=32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.Conv2d(w, w, 3, padding=1, stride=2), nn.BatchNorm2d(w), nn.ReLU())
        self.fc = nn.Linear(w, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@pytest.mark.tier  # 148 s on the 2-core VM: in CI's tier run, not the default
@pytest.mark.timeout(300)
def test_inherit_warm_start_beats_random():
    torch.manual_seed(0)
    x, y = _task()
    big = _Net()
    opt = torch.optim.Adam(big.parameters(), 3e-3)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(big(x), y).backward()
        opt.step()
    big.eval()
    xt, yt = _task(256, seed=1)
    with torch.no_grad():
        big_loss = nn.functional.cross_entropy(big(xt), yt).item()
        warm = timm_split.split(big, 2, img_size=16, init="inherit").eval()
        cold = timm_split.split(big, 2, img_size=16).eval()
        warm_losses = [nn.functional.cross_entropy(m(xt), yt).item() for m in warm.members]
        cold_losses = [nn.functional.cross_entropy(m(xt), yt).item() for m in cold.members]
        assert not torch.equal(warm.members[0].fc.weight, warm.members[1].fc.weight), "members differ"
    assert big_loss < 0.3
    assert max(warm_losses) < 0.5 * min(cold_losses), (warm_losses, cold_losses, big_loss)
    with pytest.raises(ValueError, match="init must be"):
        timm_split.split(big, 2, img_size=16, init="copy")


def test_random_split_of_trained_model_resets_running_stats():
    net = _Net()
    net.body[1].running_mean.fill_(3.0)
    net.body[1].running_var.fill_(7.0)
    ens = timm_split.split(net, 2, img_size=16)
    for m in ens.members:
        assert torch.all(m.body[1].running_mean == 0) and torch.all(m.body[1].running_var == 1)
    warm = timm_split.split(net, 2, img_size=16, init="inherit")
    assert torch.all(warm.members[0].body[1].running_var == 7.0), "inherit keeps the trained statistics"


# ---- fine-tuning like timm (issue 19)
# The backbone is planned at the architecture's cfg head and input (engine.canonical), so a checkpoint saved at
# 1000 classes loads at another head or input. The fast tier runs by default, the rest of the default tier is slow.
_FINE_TUNE = {"num_classes=10": dict(num_classes=10), "num_classes=0": dict(num_classes=0),
              "in_chans=1": dict(in_chans=1)}


# Cases the base model itself does not run (issue 19): arch -> (cases, reason)
_FINE_TUNE_BASE_FAILS = {
    "csatv2": (("in_chans=1",), "timm's csatv2 ignores in_chans; its DCT stem takes 3 channels"),
}


def _fine_tune_params():
    for p in tier_params():
        arch = p.values[0]
        for i, case in enumerate(_FINE_TUNE):
            marks = list(p.marks) + ([pytest.mark.tier] if i else [])  # the default run: the first case per arch
            cases, reason = _FINE_TUNE_BASE_FAILS.get(arch, ((), ""))
            if case in cases:
                marks.append(pytest.mark.skip(reason=reason))
            yield pytest.param(arch, case, marks=marks, id=f"{arch}-{case}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,case", list(_fine_tune_params()))
def test_fine_tune_saved_split(arch, case, tmp_path):
    """Save a splitnet at 1000 classes; re-create it from the file at another head or input as timm users do."""
    src = timm.create_model(f"splitnet_{arch}").eval()
    path = tmp_path / "model.safetensors"
    timm_split.save_checkpoint(src, path)
    kwargs = _FINE_TUNE[case]
    m = timm.create_model(f"splitnet_{arch}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **kwargs).eval()
    saved, cls = src.state_dict(), m.pretrained_cfg["classifier"]
    first_conv = set(m.pretrained_cfg["first_conv"])
    for k, v in m.state_dict().items():
        if k.rsplit(".", 1)[0] in cls or v.dtype == torch.int64:
            continue
        if k.rsplit(".", 1)[0] in first_conv and "in_chans" in kwargs and v.dim() > 1:
            try:  # timm's load_pretrained adapts each member's first conv (TResNet's space-to-depth stem too)
                want = adapt_input_conv(kwargs["in_chans"], saved[k], base_chans=src.pretrained_cfg["input_size"][0])
            except NotImplementedError:  # a linear patch embedding (NaFlexViT): timm initialises it afresh
                continue
            assert torch.allclose(v, want, atol=1e-6), k
        else:
            assert torch.equal(v, saved[k]), k
    x = torch.randn(2, kwargs.get("in_chans", 3), *m.pretrained_cfg["input_size"][1:])
    n = kwargs.get("num_classes", src.num_classes)  # eva02_tiny: a MIM backbone, num_classes 0
    with torch.no_grad():  # shapes only: gemma4's 2304 tokens keep > 20 GB of attention for backward otherwise
        assert m(x).shape == ((2, m.head_hidden_size) if n == 0 else (2, n))
        m.reset_classifier(5)
        assert m(x).shape == (2, 5) and m.num_classes == 5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,resize", [("test_vit", dict(img_size=96)),
                                         ("swin_tiny_patch4_window7_224", dict(img_size=448, window_size=14))])
def test_saved_split_loads_at_another_img_size(arch, resize, tmp_path):
    """A split saved at the cfg's size loads into ``splitnet_<arch>`` created at another ``img_size`` (the same
    backbone widths, planned at the cfg's size), its members' position embeddings and relative-position tables
    resampled by their own modules' ``checkpoint_filter_fn``: as the base model with ``img_size=`` does, and equal
    to resizing the saved split with ``set_input_size``."""
    src = timm.create_model(f"splitnet_{arch}").eval()
    path = tmp_path / "model.safetensors"
    timm_split.save_checkpoint(src, path)
    m = timm.create_model(f"splitnet_{arch}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **resize).eval()
    src.set_input_size(**{k: (v, v) if k == "img_size" else v for k, v in resize.items()})
    x = torch.randn(1, 3, resize["img_size"], resize["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))


@pytest.mark.timeout(300)
def test_checkpoint_filter_fn_keeps_a_headless_split():
    """timm's test_headless_checkpoint_reload: the filter of the ensemble's module passes a split's own
    (headless) state dict through unchanged."""
    import importlib
    model = timm.create_model("splitnet_test_vit", num_classes=0).eval()
    filter_fn = importlib.import_module(type(model).__module__).checkpoint_filter_fn
    reloaded = timm.create_model("splitnet_test_vit", num_classes=0, seed=1).eval()
    reloaded.load_state_dict(filter_fn(dict(sorted(model.state_dict().items())), reloaded))
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][-2:])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_registry_refuses_missing_backbone(tmp_path):
    """timm's loader goes strict=False for another num_classes: only the classifier may be missing."""
    from safetensors.torch import save_file

    m = timm.create_model("splitnet_test_resnet", num_classes=10)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    no_conv = {k: v for k, v in sd.items() if not (k.endswith(".weight") and v.dim() == 4)}
    save_file(no_conv, str(tmp_path / "noconv.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*nothing was loaded"):
        timm.create_model("splitnet_test_resnet", num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "noconv.safetensors")))
    no_head = {k: v for k, v in sd.items() if not k.split(".")[2] == "fc"}
    save_file(no_head, str(tmp_path / "nohead.safetensors"))
    loaded = timm.create_model("splitnet_test_resnet", num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "nohead.safetensors")))
    assert torch.equal(loaded.members[1].conv1[0].weight, m.members[1].conv1[0].weight)


def test_strict_false_allows_only_what_timms_loader_drops():
    """timm's loader drops the classifier for another num_classes and a first conv it cannot adapt to another
    in_chans (a linear patch embedding); any other missing tensor is refused."""
    m = timm.create_model("splitnet_test_resnet", num_classes=10)
    sd = m.state_dict()
    stem = {f"{n}.weight" for n in m.pretrained_cfg["first_conv"]}
    head = {k for k in sd if k.startswith(tuple(f"{n}." for n in m.pretrained_cfg["classifier"]))}
    m.load_state_dict({k: v for k, v in sd.items() if k not in stem | head}, strict=False)
    other = "members.1.conv1.1.weight"
    assert other in sd and other not in stem | head
    with pytest.raises(ValueError, match="1 missing keys.*members.1.conv1.1.weight"):
        m.load_state_dict({k: v for k, v in sd.items() if k != other}, strict=False)
    with pytest.raises(ValueError, match="2 missing keys"):
        m.load_state_dict({k: v for k, v in sd.items() if k not in stem}, strict=True)


def test_load_state_dict_changes_nothing_on_error():
    m = timm.create_model("splitnet_test_resnet", num_classes=10)
    other = timm.create_model("splitnet_test_resnet", num_classes=10, seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = other.state_dict()
    last = list(sd)[-3]
    sd[last] = torch.zeros(3, 3)  # one bad shape, after many good tensors
    with pytest.raises(ValueError, match="shape mismatch.*nothing was loaded"):
        m.load_state_dict(sd, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="missing keys"):
        m.load_state_dict({k: v for k, v in other.state_dict().items() if "conv1" not in k}, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ---- ensemble state and inputs (issue 17)
def test_split_of_eval_model_is_eval():
    base = timm.create_model("test_resnet").eval()
    ens = timm_split.split(base, 2)
    assert not ens.training and not any(mod.training for mod in ens.modules())
    assert timm_split.split(base.train(), 2).training


def test_forward_head_and_combine_check_member_dim():
    ens = timm.create_model("splitnet_test_resnet", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = ens.forward_features(x, stacked=True)
        assert f.shape[0] == 2 and torch.allclose(ens.forward_head(f, stacked=True), ens(x), atol=1e-5)
        with pytest.raises(ValueError, match=r"\[S, B, \.\.\.\] with S=2"):
            ens.forward_head(f[:1], stacked=True)
        with pytest.raises(ValueError, match="combine expects .*S=2"):
            ens.combine(ens(x))  # [B, K]: a batch average would be silently wrong
        with pytest.raises(ValueError, match=f"num_features={ens.num_features}"):
            ens.forward_head(ens.forward_features(x)[:, :64])


def test_reset_classifier_rejects_bad_counts():
    ens = timm.create_model("splitnet_test_resnet")
    for bad in (-3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            ens.reset_classifier(bad)
    assert ens.num_classes == 1000


def test_meta_ensemble_raises_on_cpu_input_like_the_original():
    with torch.device("meta"):
        base = timm.create_model("test_resnet")
    ens = timm_split.split(base, 2)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="not on the expected device"):
        base(x)
    with pytest.raises(RuntimeError, match="not on the expected device"):
        ens(x)


@pytest.mark.parametrize("strategy", ["loop", "threads", "packed", "threads+packed"])
def test_views_validated_for_every_strategy(strategy):
    ens = timm.create_model("splitnet_test_resnet", num_classes=10).eval().set_execution(strategy)
    with torch.no_grad():
        with pytest.raises(ValueError, match="3 views for 2 members"):
            ens.forward_members(torch.randn(3, 2, 3, 32, 32))
        with pytest.raises(ValueError, match="unequal batch sizes"):
            ens.forward_members([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])
        with pytest.raises(ValueError, match="4-d batch"):
            ens.forward_members([torch.randn(2, 3, 32, 32), torch.randn(3, 32, 32)])
        assert ens.forward_members(torch.randn(2, 2, 3, 32, 32)).shape == (2, 2, 10)
