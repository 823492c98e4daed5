"""Hostile inputs of issue 17 for split() arguments, the sweep CSV and the demo/compare/sweep commands.

Each test names the input class it covers in docs/reliability.md.
"""
import csv
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import timm_split
from timm_split import SplitError
from timm_split.checks import MAX_SPLIT_FACTOR
from timm_split.commands.main import main


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


# ---- split() arguments
@pytest.mark.parametrize("model,hint", [(None, r"split\(timm.create_model\('resnet18'\), 2\)"),
                                        ("resnet18", r"split\(timm.create_model\('resnet18'\), S\)"),
                                        (_net, r"call it first: split\(_net\(\), S\)")])
def test_split_needs_a_module(model, hint):
    with pytest.raises(ValueError, match="model must be an nn.Module.*" + hint):
        timm_split.split(model, 2)


@pytest.mark.parametrize("img_size", [0, -32, "32", 32.5, (32,), (16, 16, 16), (16, 0), True, np.int64(32)])
def test_bad_img_size(img_size):
    with pytest.raises(ValueError, match=r"img_size must be a positive int or \(height, width\)"):
        timm_split.split(_net(), 2, img_size=img_size)
    with pytest.raises(ValueError, match="img_size"):
        timm_split.plan_split(_net(), 2, img_size=img_size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("img_size", [16, (16, 20), [16, 16]])
def test_good_img_size_still_splits(img_size):
    ens = timm_split.split(_net(), 2, img_size=img_size)
    assert ens.split_factor == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed="abc"), "seed must be an int"), (dict(seed=-1), "seed must be an int"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(params_tol=-1), "params_tol must be a finite number > 0"), (dict(params_tol=0), "params_tol"),
    (dict(macs_tol=math.nan), "macs_tol must be a finite number > 0"), (dict(macs_tol=math.inf), "macs_tol"),
    (dict(in_chans=0), "in_chans must be None or an int >= 1"), (dict(in_chans="3"), "in_chans"),
])
def test_bad_scalar_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm_split.split(_net(), 2, img_size=16, **kwargs)


@pytest.mark.timeout(30)  # it ran for minutes: the bound is checked before tracing
@pytest.mark.parametrize("S", [MAX_SPLIT_FACTOR + 1, 4097])
def test_split_factor_bound_before_tracing(S):
    model = timm.create_model("resnet18")
    with pytest.raises(ValueError, match=f"split_factor must be <= {MAX_SPLIT_FACTOR}, got {S}"):
        timm_split.split(model, S)
    with pytest.raises(ValueError, match=f"<= {MAX_SPLIT_FACTOR}"):
        timm_split.plan_split(model, S)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_model_is_not_supported():
    with pytest.raises(SplitError, match=r"TorchScript .* is not supported.*split the eager model"):
        timm_split.split(torch.jit.script(_net()), 2, img_size=16)
    inner = _net()
    inner[0] = torch.jit.script(inner[0])
    with pytest.raises(SplitError, match="and 0 is scripted"):
        timm_split.split(inner, 2, img_size=16)


def test_nothing_to_resize():
    with pytest.raises(SplitError, match="Identity has no parameters: there is nothing to split"):
        timm_split.split(nn.Identity(), 2, img_size=16)


def _qat() -> nn.Module:
    m = nn.Sequential(torch.ao.quantization.QuantStub(), *_net(), torch.ao.quantization.DeQuantStub())
    m.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    return torch.ao.quantization.prepare_qat(m.train())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("build,match", [
    (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 16, 3)), *list(_net())[1:]),
     r"0: _WeightNorm on weight\).*remove_parametrizations"),
    (lambda: nn.Sequential(*list(_net())[:4], nn.utils.parametrizations.spectral_norm(nn.Linear(16, 10))),
     r"4: _SpectralNorm on weight"),
    (lambda: nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 16, 3)), *list(_net())[1:]),
     r"0: WeightNorm on weight\).*remove_weight_norm"),
    (_qat, r"1.weight_fake_quant: FusedMovingAvgObsFakeQuantize.*prepare each member"),
], ids=["weight_norm", "spectral_norm", "old_weight_norm", "qat"])
def test_reparametrized_weights_are_named(build, match):
    model = build()
    with pytest.raises(SplitError, match=match):
        timm_split.split(model, 2, img_size=16)


# ---- sweep CSV
def _fake_sweep_one(arch, splits, *args, **kwargs):
    return [dict(arch=arch, module="m", split=S, status="ok", reason="", seconds=0.1) for S in splits]


@pytest.mark.timeout(60)
def test_sweep_resumes_a_csv_cut_mid_row(tmp_path, monkeypatch):
    """The last row was cut mid-write: it is skipped (its architecture runs again) and the next row is written
    on a line of its own instead of onto the half row."""
    from timm_split.commands import sweep

    out = tmp_path / "sweep.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sweep.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerow(_fake_sweep_one("a", [2])[0])
    with open(out, "a") as f:
        f.write("b,m,2,o")  # killed here
    monkeypatch.setattr(sweep, "sweep_one", _fake_sweep_one)  # the forked workers inherit it
    rows = sweep.run_sweep(["a", "b"], [2], str(out), progress=False)
    assert [(r["arch"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok")]
    assert out.read_text().splitlines()[-2:] == ["b,m,2,o", "b,m,2,ok,,,,,,,,,0.1"]


def test_sweep_refuses_a_foreign_csv(tmp_path):
    from timm_split.commands.sweep import run_sweep

    out = tmp_path / "other.csv"
    out.write_text("name,value\nx,1\n")
    with pytest.raises(ValueError, match="is not a timm-split sweep CSV"):
        run_sweep(["a"], [2], str(out), progress=False)


# ---- CLI: exit 2, one line naming the fix, no traceback
def _usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


def test_demo_unknown_model(capsys):
    assert "unknown model 'resnt18'; did you mean: resnet18" in _usage_error(capsys, "demo", "--model", "resnt18")


def test_compare_split_bound(capsys):
    assert f"split_factor must be <= {MAX_SPLIT_FACTOR}, got 10000" in _usage_error(
        capsys, "compare", "resnet18", "--split", "10000")


def test_compare_plot_unwritable_fails_before_counting(capsys, tmp_path, monkeypatch):
    import timm_split.commands.compare

    def no_counting(*args, **kwargs):
        raise AssertionError("counted before checking --plot")

    monkeypatch.setattr(timm_split.commands.compare, "compare_rows", no_counting)
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    err = _usage_error(capsys, "compare", "resnet18", "--split", "2", "--plot", str(blocker / "cost.png"))
    assert "--plot" in err and "does not exist (or is a file)" in err
    err = _usage_error(capsys, "compare", "resnet18", "--split", "2", "--plot", str(tmp_path))
    assert "is a folder" in err


def test_sweep_usage_errors(capsys, tmp_path, monkeypatch):
    from timm_split.commands import sweep

    def no_sweep(*args, **kwargs):
        raise AssertionError("swept before checking the arguments")

    monkeypatch.setattr(sweep, "run_sweep", no_sweep)
    base = ["sweep", "--filter", "resnet18", "--limit", "1"]
    assert "split factor must be an int >= 1, got 0" in _usage_error(
        capsys, *base, "--split", "0", "--out", str(tmp_path / "a.csv"))
    assert "--report 'missing.csv': no such file" in _usage_error(capsys, *base, "--report", "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "has no sweep rows" in _usage_error(capsys, *base, "--report", str(empty))
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    assert "--out" in _usage_error(capsys, *base, "--out", str(blocker / "s.csv"))
    assert "--markdown" in _usage_error(capsys, *base, "--out", str(tmp_path / "s.csv"), "--markdown",
                                        str(blocker / "z.md"))
    assert "--timeout must be a number of seconds > 0" in _usage_error(capsys, *base, "--timeout", "nan")
    assert "--workers must be an int >= 1" in _usage_error(capsys, *base, "--workers", "0")


# ---- issue 27: library
def test_users_backward_hooks_are_not_copied_to_members():
    """Full, old-style and pre backward hooks on the input model fire once on the original, never on members."""
    model = timm.create_model("test_resnet", num_classes=4)
    fired = []
    model.fc.register_full_backward_hook(lambda mod, gin, gout: fired.append("full"))
    model.layer1.register_full_backward_pre_hook(lambda mod, gout: fired.append("pre"))
    model.conv1.register_backward_hook(lambda mod, gin, gout: fired.append("old"))
    for S in (1, 2):
        ens = timm_split.split(model, S, img_size=32)
        ens(torch.randn(2, 3, 32, 32)).sum().backward()
        assert fired == [], f"S={S}: a member carries the user's backward hook"
        assert all(m._is_full_backward_hook is None for m in ens.modules())
    with pytest.warns(FutureWarning):  # torch's warning about the old-style hook: it is still there
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert sorted(fired) == ["full", "old", "pre"], "the original keeps its hooks"


@pytest.mark.parametrize("factor", ["2", 1.5, 0, True])
def test_registry_split_factor_is_the_same_value_error_as_split(factor):
    with pytest.raises(ValueError, match="split_factor must be an int >= 1"):
        timm.create_model("splitnet_test_resnet", split_factor=factor)
    with pytest.raises(ValueError, match="split_factor must be an int >= 1"):
        timm_split.split(timm.create_model("test_resnet"), factor)


def test_split_under_inference_mode_gives_the_same_trainable_ensemble():
    model = timm.create_model("test_resnet", num_classes=4)
    ref = timm_split.split(model, 2, img_size=32)
    with torch.inference_mode():
        plan = timm_split.plan_split(model, 2, img_size=32)
        ens = timm_split.split(model, 2, img_size=32)
        for k, v in ref.state_dict().items():  # the same members, seed for seed
            torch.testing.assert_close(ens.state_dict()[k], v)
        assert ens.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert plan == ens.split_plan
    assert not any(t.is_inference() for t in ens.state_dict().values())
    assert all(p.requires_grad for p in ens.parameters())
