"""timm_split.train and `timm-split train` on tiny IDX files the tests write themselves."""
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from timm_split.cli import main
from timm_split.data import write_idx
from timm_split.train import (TrainConfig, build_model, classification_metrics, create_loaders,
                              expected_calibration_error, load_checkpoint, train)

N_TRAIN, N_TEST, BATCH = 128, 64, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny Fashion-MNIST-shaped IDX files: class c is a bright square at a class-dependent place."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.RandomState(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.randint(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 8, 4:20] = 255
        write_idx(str(root / f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(str(root / f"{split}-labels-idx1-ubyte"), labels)  # one plain, one gz: both are found
    return str(root)


def _cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(model="test_resnet", data_dir=data_dir, epochs=1, batch_size=BATCH, lr=0.05, out=str(out),
                device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def s2_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2")
    return train(_cfg(data_dir, out, split=2), progress=False), out


def _read_log(out):
    with open(os.path.join(out, "log.json")) as f:
        return json.load(f)


def _check_run(log, out, split):
    assert os.path.isfile(os.path.join(out, "last.safetensors")) and os.path.isfile(os.path.join(out, "last_state.pth"))
    disk = _read_log(out)
    assert disk["epochs"] == log["epochs"] and len(disk["epochs"]) == 1
    e = disk["epochs"][0]
    assert e["epoch"] == 1 and e["step"] == N_TRAIN // BATCH and math.isfinite(e["loss"])
    assert len(e["test"]["members"]) == split and set(e["test"]["ensemble"]) == {"top1", "nll", "ece"}
    assert disk["params"] == sum(disk["member_params"]) > 0 and disk["gmacs"] > 0
    with safe_open(os.path.join(out, "last.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["epoch"] == "1" and meta["split"] == str(split) and meta["step"] == str(N_TRAIN // BATCH)
    assert {k.split(".")[1] for k in keys} == {str(i) for i in range(split)}  # members.<i>.<name>


def test_train_split1_cli(data_dir, tmp_path, capsys):
    rc = main(["train", "--model", "test_resnet", "--data-dir", data_dir, "--epochs", "1", "--batch-size",
               str(BATCH), "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert "top-1" in capsys.readouterr().out
    _check_run(_read_log(tmp_path), tmp_path, 1)


def test_train_split2(s2_run):
    log, out = s2_run
    _check_run(log, out, 2)
    assert log["config"]["split"] == 2 and log["epochs"][0]["cot"] > 0  # co-training term on by default
    assert log["final"] == log["epochs"][-1]["test"]


def test_resume_continues_and_matches_a_straight_run(data_dir, tmp_path, monkeypatch):
    import timm_split.train as tr

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(_cfg(data_dir, straight, split=2, epochs=2), progress=False)

    real_save = tr.save_checkpoint

    def save_then_crash(*args, **kwargs):  # the job dies right after its first checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data_dir, crashed, split=2, epochs=2), progress=False)
    monkeypatch.setattr(tr, "save_checkpoint", real_save)

    ens = build_model(_cfg(data_dir, crashed, split=2, epochs=2))
    meta = load_checkpoint(str(crashed), ens)
    saved = load_file(os.path.join(crashed, "last.safetensors"))
    assert meta["epoch"] == 1 and meta["step"] == N_TRAIN // BATCH
    assert ens.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in ens.state_dict().items())  # weights equal

    log = train(_cfg(data_dir, crashed, split=2, epochs=2, resume=str(crashed)), progress=False)
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert [e["step"] for e in log["epochs"]] == [N_TRAIN // BATCH, 2 * N_TRAIN // BATCH]
    with safe_open(os.path.join(crashed, "last.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == "2"
    # the resumed run replays what the uninterrupted one did (per-epoch reseeding, stateless LR schedule)
    a, b = load_file(str(crashed / "last.safetensors")), load_file(str(straight / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _reference(logits, target, n_bins=15):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.sum() / len(target) * abs((pred[m] == target[m]).mean() - conf[m].mean())
    return 100 * (pred == target).mean(), -np.log(p[np.arange(len(target)), target]).mean(), ece


def test_metrics_against_a_reference():
    rng = np.random.RandomState(0)
    logits, target = rng.randn(200, 10) * 3, rng.randint(0, 10, 200)
    got = classification_metrics(torch.tensor(logits), torch.tensor(target))
    top1, nll, ece = _reference(logits, target)
    assert got["top1"] == pytest.approx(top1) and got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    # by hand: confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins 13 and 8 -> |0.5-0.9|*2/3 + |1-0.6|/3
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 1])) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def test_missing_data_names_the_package(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(_cfg(str(tmp_path), tmp_path / "out"), progress=False)
    assert main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_bad_argument_is_a_usage_error(data_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data-dir", data_dir, "--split", "0"])
    assert "split must be an int >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("same_view", [False, True])
def test_same_view(data_dir, tmp_path, same_view):
    loader, _ = create_loaders(_cfg(data_dir, tmp_path, split=2, same_view=same_view), torch.device("cpu"))
    views, target = next(iter(loader))
    assert views.shape == (2, BATCH, 1, 28, 28) and target.shape == (BATCH,)
    assert torch.equal(views[0], views[1]) == same_view


def test_no_cot(data_dir, tmp_path, s2_run):
    log = train(_cfg(data_dir, tmp_path, split=2, no_cot=True), progress=False)
    e, e_cot = log["epochs"][0], s2_run[0]["epochs"][0]
    assert e["cot"] == 0 and e["cot_weight"] == 0 and e["loss"] == e["ce"]
    assert e_cot["cot"] > 0 and e_cot["cot_weight"] > 0


def test_execution_threads_trains_as_the_loop(data_dir, tmp_path, s2_run):
    """--execution threads (forward and backward on worker threads) gives the loop's run, to float tolerance."""
    log = train(_cfg(data_dir, tmp_path, split=2, execution="threads"), progress=False)
    e, ref = log["epochs"][0], s2_run[0]["epochs"][0]
    assert log["config"]["execution"] == "threads"
    assert e["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert e["test"]["ensemble"]["nll"] == pytest.approx(ref["test"]["ensemble"]["nll"], rel=1e-3)


def test_bad_execution_names_the_choices(data_dir, tmp_path):
    with pytest.raises(ValueError, match="execution must be one of .*'threads'"):
        train(_cfg(data_dir, tmp_path, split=2, execution="fast"), progress=False)
