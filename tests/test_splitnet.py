"""timm integration (issue 4): the registry, cfgs, checkpoints and the inherit warm start."""
import pytest
import timm
import torch
from torch import nn

import timm_split


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
    # timm's pretrained convention with a local file
    loaded = timm.create_model("splitnet_resnet18", pretrained=True, num_classes=5,
                               pretrained_cfg_overlay=dict(file=str(path)))
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
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("splitnet_resnet18", features_only=True)


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
