"""`timm-split train` / `validate` end to end on a tiny ImageFolder of PNGs the tests write themselves."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from timm_split.commands.main import main
from timm_split.training.data import MemberBatchAugment, create_member_loader, export_fashion_mnist
from timm_split.commands.train import train, train_args
from timm_split.training.metrics import classification_metrics, expected_calibration_error

from conftest import fake_fashion_idx

PER_CLASS, VAL_PER_CLASS, BATCH = 20, 4, 20


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fake_fashion_idx(tmp_path_factory.mktemp("idx"), PER_CLASS, VAL_PER_CLASS)


@pytest.fixture(scope="module")
def folder(idx_dir, tmp_path_factory):
    """A 200 + 40 PNG ImageFolder (train/validation), written by the export helper."""
    out = tmp_path_factory.mktemp("png") / "fmnist"
    assert export_fashion_mnist(str(out), idx_dir=idx_dir) == {"train": 200, "validation": 40}
    return str(out)


def _args(folder, out, **kw):
    base = dict(data_dir=folder, model="test_resnet", img_size=28, epochs=1, batch_size=BATCH, workers=0,
                lr=0.05, warmup_epochs=0, output=str(out), experiment="run", device="cpu", seed=0,
                log_interval=1000, execution="loop")  # the default 'auto' has its own test (it times trial calls)
    base.update(kw)
    return train_args(**base)


def _run(folder, out, **kw):
    return train(_args(folder, out, **kw), progress=False), os.path.join(str(out), "run")


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_export_keeps_label_order(folder):
    classes = sorted(os.listdir(os.path.join(folder, "train")))
    assert classes[0] == "0_t_shirt_top" and classes[9] == "9_ankle_boot"
    assert all(len(os.listdir(os.path.join(folder, "train", c))) == PER_CLASS for c in classes)


@pytest.mark.timeout(600)
def test_readme_recipe_then_validate(folder, tmp_path, capsys):
    """The README's commands, tiny: S=2 with RandAugment, random erasing, mixup, EMA and bf16; then validate."""
    out = tmp_path / "runs"
    rc = main(["train", "--data-dir", folder, "--model", "test_resnet", "--split", "2", "--img-size", "28",
               "--epochs", "1", "-b", str(BATCH), "-j", "0", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25",
               "--mixup", "0.2", "--model-ema", "--amp", "--output", str(out), "--experiment", "r", "--no-progress",
               "--warmup-epochs", "0"])
    assert rc == 0, capsys.readouterr().err
    run = out / "r"
    assert {"last.safetensors", "model_best.safetensors", "checkpoint-0.safetensors", "summary.csv",
            "args.json", "results.json"} <= set(os.listdir(run))
    rows = _summary(run)
    assert list(rows[0])[:4] == ["epoch", "train_loss", "train_ce", "train_cot"] and rows[0]["epoch"] == "0"
    assert {"eval_top1", "eval_top5", "eval_loss", "eval_ece", "eval_m0_top1", "eval_m1_top1", "lr"} <= set(rows[0])
    modes = {f: os.stat(run / f).st_mode & 0o777 for f in ("last.safetensors", "summary.csv", "args.json")}
    assert len(set(modes.values())) == 1, modes
    results = tmp_path / "res.csv"
    rc = main(["validate", "--checkpoint", str(run / "model_best.safetensors"), "--data-dir", folder, "-j", "0",
               "--use-ema", "--results-file", str(results)])
    assert rc == 0, capsys.readouterr().err
    with open(results, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["member"] for r in got] == ["ensemble", "0", "1"] and got[0]["model"] == "splitnet_test_resnet"
    # the summary's eval metrics are the EMA's (timm's rule), and validate reproduces them
    assert float(got[0]["top1"]) == pytest.approx(float(rows[0]["eval_top1"]), abs=1e-3)
    assert float(got[0]["nll"]) == pytest.approx(float(rows[0]["eval_loss"]), rel=1e-3)


@pytest.mark.timeout(600)
def test_validate_a_pth_state_dict_of_a_splitnet(folder, tmp_path, capsys):
    import timm

    ens = timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=10)
    torch.save(ens.state_dict(), tmp_path / "w.pth")
    rc = main(["validate", "--model", "splitnet_test_resnet", "--split", "2", "--num-classes", "10", "--checkpoint",
               str(tmp_path / "w.pth"), "--img-size", "28", "--data-dir", folder, "-j", "0", "--results-file",
               str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    rows = json.load(open(tmp_path / "r.json"))
    assert [r["member"] for r in rows] == ["ensemble", "0", "1"] and all(0 <= r["ece"] <= 1 for r in rows)
    assert rows[0]["img_size"] == 28 and rows[0]["top1"] + rows[0]["top1_err"] == pytest.approx(100)


@pytest.mark.timeout(600)
def test_resume_is_bit_identical(folder, tmp_path, monkeypatch):
    import timm_split.commands.train as tr

    straight = _run(folder, tmp_path / "a", epochs=2, model_ema=True, mixup=0.2, reprob=0.25)[1]
    real, calls = tr.train_one_epoch, []

    def stop_after_first_epoch(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_one_epoch", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, tmp_path / "b", epochs=2, model_ema=True, mixup=0.2, reprob=0.25)
    monkeypatch.setattr(tr, "train_one_epoch", real)
    crashed = os.path.join(tmp_path, "b", "run")
    from timm_split.checkpoint import read_metadata
    first = json.loads(read_metadata(os.path.join(crashed, "last.safetensors"))["state"])["train_seconds"]
    results = _run(folder, tmp_path / "b", epochs=2, model_ema=True, mixup=0.2, reprob=0.25,
                   resume=os.path.join(crashed, "last.safetensors"))[0]
    assert results["train_seconds"] > first > 0  # the run's total time survives the resume
    a, b = load_file(os.path.join(straight, "last.safetensors")), load_file(os.path.join(crashed, "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("_train.ema.") for k in a)
    assert any(k.startswith("_train.optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert _summary(straight) == _summary(crashed)


@pytest.mark.timeout(600)
def test_checkpoint_hist_keeps_the_best(folder, tmp_path):
    _, run = _run(folder, tmp_path, epochs=3, checkpoint_hist=2, lr=0.2)
    rows = _summary(run)
    kept = sorted(f for f in os.listdir(run) if f.startswith("checkpoint-"))
    assert len(kept) == 2
    ranked = sorted(range(3), key=lambda e: (-float(rows[e]["eval_top1"]), e))  # ties keep the earlier epoch
    assert kept == sorted(f"checkpoint-{e}.safetensors" for e in ranked[:2])
    best = load_file(os.path.join(run, "model_best.safetensors"))
    ref = load_file(os.path.join(run, f"checkpoint-{ranked[0]}.safetensors"))
    assert all(torch.equal(best[k], ref[k]) for k in ref)


@pytest.mark.timeout(600)
def test_ema_decay(folder, tmp_path):
    """ModelEmaV3 updated every step (timm's rule: the first update copies): decay 1 then freezes, 0 follows."""
    _, run1 = _run(folder, tmp_path / "one", epochs=2, model_ema=True, model_ema_decay=1.0)
    e0, e1 = (load_file(os.path.join(run1, f"checkpoint-{e}.safetensors")) for e in (0, 1))
    ema_keys = [k for k in e0 if k.startswith("_train.ema.") and e0[k].is_floating_point()]
    assert ema_keys and all(torch.equal(e0[k], e1[k]) for k in ema_keys)
    assert not all(torch.equal(e0[k[len("_train.ema."):]], e1[k[len("_train.ema."):]]) for k in ema_keys)
    _, run0 = _run(folder, tmp_path / "zero", model_ema=True, model_ema_decay=0.0)
    sd = load_file(os.path.join(run0, "last.safetensors"))
    for k in ema_keys:
        torch.testing.assert_close(sd[k], sd[k[len("_train.ema."):]], rtol=0, atol=1e-6)


@pytest.mark.timeout(600)
def test_grad_accumulation_matches_a_big_batch(folder, tmp_path):
    """batch 20 == batch 10 x 2 accumulation steps (a BN-free model, no batch-level randomness)."""
    kw = dict(model="test_convnext", img_size=32, split=2, color_jitter=0.0, smoothing=0.0, cot_warmup_epochs=0.0)
    big, run_big = _run(folder, tmp_path / "big", batch_size=20, **kw)
    acc, run_acc = _run(folder, tmp_path / "acc", batch_size=10, grad_accum_steps=2, **kw)
    a, b = load_file(os.path.join(run_big, "last.safetensors")), load_file(os.path.join(run_acc, "last.safetensors"))
    assert json.loads(open(os.path.join(run_acc, "results.json")).read())["final"] is not None
    for k in a:
        if not k.startswith("_train."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    one, _ = _run(folder, tmp_path / "one", batch_size=10, **kw)  # without accumulation: twice the updates
    assert one["final"]["loss"] != pytest.approx(acc["final"]["loss"], rel=1e-6)


@pytest.mark.timeout(600)
def test_channels_last_trains_as_contiguous(folder, tmp_path):
    """Same run to float tolerance (a small lr keeps 10 steps of float drift small)."""
    base, run0 = _run(folder, tmp_path / "nchw", split=2, lr=1e-3)
    cl, run = _run(folder, tmp_path / "nhwc", split=2, lr=1e-3, channels_last=True)
    assert float(_summary(run)[0]["train_loss"]) == pytest.approx(float(_summary(run0)[0]["train_loss"]), rel=1e-4)
    assert cl["final"]["loss"] == pytest.approx(base["final"]["loss"], rel=1e-4)
    assert all(m["top1"] == n["top1"] for m, n in zip(cl["final"]["members"], base["final"]["members"]))


@pytest.mark.timeout(600)
def test_split1_is_the_plain_model(folder, tmp_path):
    results, run = _run(folder, tmp_path, split=1, cot_weight=0.5)
    assert len(results["final"]["members"]) == 1 and results["params"] > 0
    row = _summary(run)[0]
    assert float(row["train_cot"]) == 0 and float(row["train_loss"]) == float(row["train_ce"])


@pytest.mark.timeout(600)
def test_execution_threads_trains_as_the_loop(folder, tmp_path):
    """--execution threads (forward and backward on worker threads) gives the loop's run, to float tolerance."""
    loop, _ = _run(folder, tmp_path / "loop", split=2, lr=1e-3, execution="loop")
    threads, run = _run(folder, tmp_path / "threads", split=2, lr=1e-3, execution="threads", model_ema=True)
    assert json.load(open(os.path.join(run, "args.json")))["execution"] == "threads"
    assert threads["final"] is not None and len(threads["final"]["members"]) == 2  # EMA (a deepcopy) evaluated
    assert float(_summary(run)[0]["train_loss"]) == pytest.approx(
        float(_summary(os.path.join(tmp_path, "loop", "run"))[0]["train_loss"]), rel=1e-4)


@pytest.mark.timeout(600)
def test_auto_execution_is_recorded_and_reused_on_resume(folder, tmp_path, caplog):
    """The default --execution auto decides on the first step; the checkpoint records the choice and --resume
    runs it (so the resumed steps compute as the first run's did)."""
    from timm_split.checkpoint import read_metadata
    from timm_split.execution import STRATEGIES

    _, run = _run(folder, tmp_path, split=2, execution="auto")
    chosen = json.loads(read_metadata(os.path.join(run, "last.safetensors"))["state"])["execution"]
    assert chosen in STRATEGIES and chosen != "auto"
    with caplog.at_level(logging.INFO, logger="timm_split"):
        _run(folder, tmp_path, split=2, epochs=2, resume=os.path.join(run, "last.safetensors"), execution="auto")
    assert f"--execution auto: {chosen}, as chosen when this run started" in caplog.text


def test_mixup_is_shared_by_the_members():
    """One lambda, one pairing (i <-> B-1-i) and one CutMix box for every member; soft targets out."""
    from timm.data import Mixup

    S, B, C, H = 3, 4, 2, 8
    views = torch.randn(S, B, C, H, H)
    target = torch.arange(B)
    mix = MemberBatchAugment(mixup=Mixup(mixup_alpha=0.2, num_classes=10))
    mixed, soft = mix(views.clone(), target)
    lam = float(soft[0, 0])  # label smoothing 0.1 is timm's default: undo it
    lam = (lam - 0.1 / 10) / (1 - 0.1)
    for s in range(S):
        torch.testing.assert_close(mixed[s], lam * views[s] + (1 - lam) * views[s].flip(0), rtol=1e-5, atol=1e-5)
    assert soft.shape == (B, 10) and torch.allclose(soft.sum(1), torch.ones(B))
    cut = MemberBatchAugment(mixup=Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=10))
    torch.manual_seed(1)
    mixed, _ = cut(views.clone(), target)
    boxes = [(mixed[s] != views[s]).any(0).any(0) for s in range(S)]  # [H, W] mask per member
    assert boxes[0].any() and all(torch.equal(boxes[0], b) for b in boxes)
    for s in range(S):
        torch.testing.assert_close(mixed[s][..., boxes[0]], views[s].flip(0)[..., boxes[0]])


def test_random_erasing_is_per_view():
    views = torch.zeros(2, 8, 1, 16, 16)
    erased, _ = MemberBatchAugment(re_prob=1.0, re_mode="pixel")(views.clone(), torch.zeros(8, dtype=torch.long))
    masks = (erased != 0).any(2)  # [S, B, H, W]
    assert masks.any() and not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("same_view", [False, True])
def test_same_view(folder, same_view):
    from timm.data import create_dataset

    ds = create_dataset("", root=folder, split="train")
    cfg = {"input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    loader = create_member_loader(ds, 2, cfg, 8, torch.device("cpu"), same_view=same_view, num_workers=0)
    views, target = next(iter(loader))
    assert views.shape == (2, 8, 3, 28, 28) and target.shape == (8,)
    assert torch.equal(views[0], views[1]) == same_view


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
    top5 = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, target)]) * 100
    return 100 * (pred == target).mean(), top5, -np.log(p[np.arange(len(target)), target]).mean(), ece


def test_metrics_against_a_reference():
    rng = np.random.RandomState(0)
    logits, target = rng.randn(200, 10) * 3, rng.randint(0, 10, 200)
    got = classification_metrics(torch.tensor(logits), torch.tensor(target))
    top1, top5, nll, ece = _reference(logits, target)
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert got["loss"] == pytest.approx(nll, rel=1e-5) and got["ece"] == pytest.approx(ece, abs=1e-6)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 1])) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_members_mode(training):
    from torch import nn

    from timm_split import SplitEnsemble
    from timm_split.training.metrics import evaluate
    ens = SplitEnsemble([nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 3)) for _ in range(2)])
    ens.train(training)
    loader = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
    first = evaluate(ens, loader)
    assert [m.training for m in ens.modules()] == [training] * len(list(ens.modules()))
    assert evaluate(ens, loader)["loss"] == first["loss"], "dropout was active during evaluation"
