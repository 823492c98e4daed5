"""``timm_split.export`` and ``timm-split export``: one file with all members and the averaging, checked against
PyTorch; bad input gets one line, exit 2 and no file.

The default run exports ``test_resnet`` at S=2 (ONNX and pt2, with the check) and tries the bad inputs; the
``tier`` marker runs one architecture per timm family of the test tier (conftest's FAST and TIER) at S=2 and S=4 to
both formats, the other families of the default tier are marked slow.
"""
import json
import os

import pytest
import timm
import torch
from torch import nn

from conftest import FAST, TIER, tier_params
import timm_split
from timm_split.commands.main import main
from timm_split.ensemble import SplitEnsemble
from timm_split.export import MAX_OPSET, MIN_OPSET, ExportError, export_ensemble, export_metadata

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def resnet_s2():
    return timm_split.split(timm.create_model("test_resnet", num_classes=10), 2)


def test_onnx_holds_all_members_and_the_average(resnet_s2, tmp_path):
    import onnxruntime as ort

    ens = resnet_s2.train()
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    path = tmp_path / "r.onnx"
    result = export_ensemble(ens, path, img_size=64, batch_size=2, check=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert ens.training and all(m.training for m in ens.modules())  # flags restored
    assert all(torch.equal(v, ens.state_dict()[k]) for k, v in before.items())
    assert _files(tmp_path) == ["r.onnx"]
    meta = export_metadata(path)
    assert meta["split_factor"] == "2" and meta["averaging"] == "logits" and meta["graph"] == "members"
    assert json.loads(meta["input_size"]) == [3, 64, 64] and meta["num_classes"] == "10"
    assert json.loads(meta["mean"]) == list(ens.pretrained_cfg["mean"]) and meta["opset"] == "18"
    assert json.loads(meta["pretrained_cfg"])["input_size"] == list(ens.pretrained_cfg["input_size"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = ens.eval()(x)
    ens.train()
    out = sess.run(None, {"input": x.numpy()})[0]
    assert out.shape == (2, 10) and float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4


def test_pt2_dynamic_batch_with_probs_averaging(resnet_s2, tmp_path):
    ens = SplitEnsemble(list(resnet_s2.members), resnet_s2.split_plan, resnet_s2.pretrained_cfg, averaging="probs")
    path = tmp_path / "r.pt2"
    result = export_ensemble(ens, path, format="pt2", img_size=48, dynamic_batch=True, check=True)
    assert result.max_abs_diff <= 1e-4 and _files(tmp_path) == ["r.pt2"]
    meta = export_metadata(path)
    assert meta["output_name"] == "log_probs" and meta["batch_size"] == "-1" and meta["averaging"] == "probs"
    with open(path, "rb") as f:
        prog = torch.export.load(f).module()
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(prog(x), ens.eval()(x), atol=1e-4)


class _Erfinv(nn.Module):
    def forward(self, x):
        return torch.erfinv(torch.tanh(x) * 0.5)


class _NumPy(nn.Module):
    """Leaves torch for numpy: nothing to trace."""

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 2)


_CALLS = [0]


class _Counter(nn.Module):
    """Adds a global call count: the export bakes one call's count in, so the file differs from PyTorch."""

    def forward(self, x):
        _CALLS[0] += 1
        return x + _CALLS[0]


def _tiny(act: nn.Module, S: int = 2) -> SplitEnsemble:
    members = [nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
               for _ in range(S)]
    return SplitEnsemble(members, pretrained_cfg={"input_size": (3, 16, 16), "architecture": "tiny"}).eval()


def test_op_that_does_not_export_names_op_and_layer(tmp_path):
    path = tmp_path / "t.onnx"
    with pytest.raises(ExportError, match=r"erf_?inv.*members\.0\.1 \(_Erfinv\)"):
        export_ensemble(_tiny(_Erfinv()), path)
    with pytest.raises(ExportError, match=r"torch.export failed in member layer members\.0\.1 \(_NumPy\)"):
        export_ensemble(_tiny(_NumPy()), tmp_path / "t.pt2", format="pt2")
    with pytest.raises(ExportError, match="check failed"):
        export_ensemble(_tiny(_Counter()), path, format="pt2")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(opset=MIN_OPSET - 1), "opset must be"), (dict(opset=MAX_OPSET + 1), "opset must be"),
    (dict(format="tflite"), "format must be"), (dict(batch_size=2, dynamic_batch=True), "not both"),
    (dict(batch_size=0), "batch_size"), (dict(img_size="224"), "img_size"),
    (dict(format="pt2", opset=18), "'onnx' only"),
    (dict(graph="packed", dynamic_batch=True), "packed"), (dict(graph="fused"), "graph must be"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_ensemble(_tiny(nn.ReLU()), tmp_path / "t.onnx", **kwargs)
    with pytest.raises(ValueError, match="must be a SplitEnsemble"):
        export_ensemble(nn.Linear(2, 2), tmp_path / "t.onnx")
    assert _files(tmp_path) == []


def test_cli_export_and_check(tmp_path, capsys):
    out = tmp_path / "r.onnx"
    rc = main(["export", "--model", "test_resnet", "--split", "2", "--num-classes", "10", "--img-size", "64",
               "--dynamic-batch", "--output", str(out), "--check"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "wrote" in text and "check: max abs diff" in text and "check: onnxruntime [" in text
    assert _files(tmp_path) == ["r.onnx"] and export_metadata(out)["dynamic_batch"] == "true"


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if not e.startswith(("WARNING", "INFO"))]
    assert rc == 2 and len(err) == 1 and err[0].startswith("timm-split export: error:"), err
    return err[0]


def test_cli_bad_inputs_one_line_exit_2_no_file(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o.onnx")
    line = _one_line_error(capsys, main(["export", "--model", "test_resnet", "--opset", "99", "--output", out]))
    assert "--opset must be in" in line
    line = _one_line_error(capsys, main(["export", "--model", "test_resnet", "--output",
                                         str(tmp_path / "missing" / "o.onnx")]))
    assert "does not exist" in line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    line = _one_line_error(capsys, main(["export", "--checkpoint", str(bad), "--output", out]))
    assert "bad.safetensors" in line
    line = _one_line_error(capsys, main(["export", "--checkpoint", str(tmp_path / "none.safetensors"),
                                         "--output", out]))
    assert "no checkpoint" in line
    import timm_split.commands.export as cmd
    monkeypatch.setattr(cmd, "build_ensemble", lambda *a, **k: _tiny(_Erfinv()))
    line = _one_line_error(capsys, main(["export", "--model", "test_resnet", "--output", out, "--check"]))
    assert "members.0.1 (_Erfinv)" in line
    assert _files(tmp_path) == ["bad.safetensors"]


def test_cli_exports_a_checkpoint(resnet_s2, tmp_path, capsys):
    ckpt = tmp_path / "w.safetensors"
    timm_split.save_checkpoint(resnet_s2, ckpt)
    out = tmp_path / "w.pt2"
    rc = main(["export", "--checkpoint", str(ckpt), "--model", "test_resnet", "--split", "2", "--num-classes", "10",
               "--img-size", "32", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    with open(out, "rb") as f:
        prog = torch.export.load(f).module()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(prog(x), resnet_s2.eval()(x), atol=1e-4)



def test_a_checkpoint_that_does_not_name_its_model(resnet_s2, tmp_path, capsys):
    """save_checkpoint's file records S but no model: export needs --model (one line naming it, no file). The
    builder behind export, validate and the distillation teacher (warm_start.ensemble_from_checkpoint) refuses it
    without a model flag, names an unknown model, and with --model builds the registry's splitnet and loads it."""
    from timm_split.training.warm_start import ensemble_from_checkpoint

    ckpt = tmp_path / "w.safetensors"
    timm_split.save_checkpoint(resnet_s2, ckpt)
    line = _one_line_error(capsys, main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o.onnx")]))
    assert "does not name its model" in line and "pass --model" in line, line
    assert _files(tmp_path) == ["w.safetensors"]
    with pytest.raises(ValueError, match="does not record its model, classes and input"):
        ensemble_from_checkpoint(str(ckpt))
    with pytest.raises(ValueError, match="unknown model 'resnt18'"):
        ensemble_from_checkpoint(str(ckpt), "--checkpoint", model="resnt18", model_flag="--model")
    ens, state = ensemble_from_checkpoint(str(ckpt), "--checkpoint", model="splitnet_test_resnet", num_classes=10,
                                          model_flag="--model")
    assert state == {} and ens.split_factor == 2 and not ens.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ens(x), resnet_s2.eval()(x), atol=1e-5)

def _family_params():
    """One architecture per timm family of the default tier: the test tier (FAST, TIER) under ``tier``, the rest
    slow."""
    return [pytest.param(p.values[0], marks=[pytest.mark.tier if p.values[0] in FAST + TIER else pytest.mark.slow])
            for p in tier_params()]


@pytest.mark.parametrize("S", [2, 4])
@pytest.mark.parametrize("arch", _family_params())
def test_family_exports_to_onnx_and_pt2(arch, S, tmp_path):
    ens = timm_split.split(timm.create_model(arch), S)
    for fmt in ("onnx", "pt2"):
        result = export_ensemble(ens, tmp_path / f"m.{fmt}", format=fmt, check=True)
        assert result.max_abs_diff <= 1e-4, (arch, S, fmt)
    assert _files(tmp_path) == ["m.onnx", "m.pt2"]
