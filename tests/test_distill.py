"""``-c/--config`` (timm's YAML of defaults) and distillation (``--kd-*``, ``--initial-checkpoint``,
``--split-init inherit``) in ``timm-split train``, on a tiny ImageFolder; one run of each kind, shared by the tests."""
import argparse
import csv
import json
import os
import shutil

import pytest
import torch

from timm_split.checkpoint import read_metadata, training_state
from timm_split.commands.main import build_parser, main
from timm_split.commands.train import train, train_args
from timm_split.commands.train_flags import add_train_args
from timm_split.training.distill import DistillationLoss, DistillOptions, MemberTeacher, file_sha256
from timm_split.training.loss import CoTrainingLoss

from conftest import tiny_png_folder

RECIPE = """\
# a timm recipe's shape (its hparams.yaml): flag dests, timm's spellings
model: test_resnet
split: 2
batch_size: 20
epochs: 1
opt: sgd
lr: 0.05
momentum: 0.9
weight_decay: 2.0e-05
sched: cosine
warmup_epochs: 0
smoothing: 0.1
aa: rand-m9-mstd0.5
reprob: 0.25
mixup: 0.2
model_ema: true
model_ema_decay: 0.9998
amp: false
workers: 0
drop_path: 0.05
decay_milestones: [10, 20]
model_kwargs: {zero_init_last: false}
kd_temperature: 2.0
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_png_folder(tmp_path_factory, per_class=4, val_per_class=2)  # 40 train, 20 validation images


def _args(folder, out, experiment, **kw):
    base = dict(data_dir=folder, model="test_resnet", img_size=16, epochs=1, batch_size=20, workers=0, lr=0.05,
                warmup_epochs=0, output=str(out), experiment=experiment, device="cpu", seed=0, log_interval=1000,
                execution="loop")
    base.update(kw)
    return train_args(**base)


def _resume(folder, last, **kw):
    """Resume the run of ``last`` in its own folder (no --output/--experiment)."""
    return _args(folder, "", "", resume=last, epochs=2, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def parent(folder, runs):
    """A trained single network (S=1): the model to split and the teacher."""
    train(_args(folder, runs, "parent"), progress=False)
    return os.path.join(str(runs), "parent", "last.safetensors")


@pytest.fixture(scope="module")
def distilled(folder, runs, parent):
    """The one-line "split my trained model": inherit from the parent, distil from it."""
    rc = main(["train", "--data-dir", folder, "--model", "test_resnet", "--img-size", "16", "--epochs", "1", "-b", "20",
               "-j", "0", "--lr", "0.05", "--warmup-epochs", "0", "--device", "cpu", "--no-progress",
               "--execution", "loop", "--output", str(runs), "--experiment", "child",
               "--initial-checkpoint", parent, "--split", "2", "--split-init", "inherit",
               "--kd-model-checkpoint", parent, "--kd-temperature", "2"])
    assert rc == 0
    return os.path.join(str(runs), "child")


def _state(path):
    return training_state(read_metadata(path))


# ----------------------------------------------------------------------------------------------------------
# -c/--config


def test_config_sets_defaults_and_the_command_line_wins(tmp_path):
    """timm's two passes: the YAML's values are the defaults; a flag given on the command line (before or after
    -c) wins; the rest keep their own defaults; the next parse with the same parser starts from them again."""
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    args = build_parser().parse_args(["train", "--epochs", "3", "-c", str(path), "--lr", "0.1"])
    assert (args.epochs, args.lr) == (3, 0.1)  # the command line
    assert (args.model, args.split, args.batch_size, args.aa, args.mixup, args.model_ema) == \
        ("test_resnet", 2, 20, "rand-m9-mstd0.5", 0.2, True)  # the YAML
    assert args.decay_milestones == [10, 20] and args.model_kwargs == {"zero_init_last": False}
    assert args.kd_temperature == 2.0 and args.seed == 42 and args.config == str(path)  # a default, untouched
    parser = add_train_args(argparse.ArgumentParser())
    assert parser.parse_args(["-c", str(path), "-b", "8"]).batch_size == 8
    assert parser.parse_args([]).batch_size == 128 and parser.parse_args([]).model == "resnet50"  # no leak
    a = train_args(config=str(path), epochs=2)
    assert (a.model, a.epochs, a.warmup_epochs, a.weight_decay) == ("test_resnet", 2, 0, 2e-5)


@pytest.mark.parametrize("text, named", [
    ("batch_sz: 64\nepochs: 1\n", "batch_sz (did you mean batch_size"),
    ("model: test_resnet\nlog_wandb: true\n", "log_wandb"),
    ("epochs: ten\n", "epochs: 'ten' is not a int value"),
    ("cot_mode: l2\n", "one of js, kl, kl_mixture"),
    ("- a list\n", "not a mapping"),
])
def test_config_refuses_unknown_keys_and_bad_values(tmp_path, capsys, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and str(path) in err and len(err.strip().splitlines()) <= 2, err


# ----------------------------------------------------------------------------------------------------------
# distillation


def test_inherit_and_distil_runs_and_logs_the_loss_parts(distilled, parent):
    """--initial-checkpoint PARENT --split 2 --split-init inherit --kd-model-checkpoint PARENT: one epoch; the kd
    part is in summary.csv beside ce and cot; the checkpoint records the teacher (name, file sha256)."""
    with open(os.path.join(distilled, "summary.csv"), newline="") as f:
        row = next(csv.DictReader(f))
    assert list(row)[:5] == ["epoch", "train_loss", "train_ce", "train_cot", "train_kd"]
    assert float(row["train_kd"]) > 0 and float(row["train_ce"]) > 0
    state = _state(os.path.join(distilled, "last.safetensors"))
    assert state["distill"]["teacher"]["name"] == "test_resnet"
    assert state["distill"]["teacher"]["sha256"] == file_sha256(parent)
    assert state["distill"]["options"]["temperature"] == 2.0
    with open(os.path.join(distilled, "results.json")) as f:
        assert json.load(f)["final"]["top1"] >= 0


def test_inherit_takes_the_parents_weights(folder, parent, tmp_path):
    """The members start from the parent's channels: every filter of member 0's stem is one of the parent's."""
    from timm_split.commands.train import build_model

    args = _args(folder, tmp_path, "x", initial_checkpoint=parent, split=2, split_init="inherit")
    data_cfg = {"input_size": (3, 16, 16)}
    ens = build_model(args, 10, data_cfg)
    sd = {k[len("members.0."):]: v for k, v in _parent_weights(parent).items() if k.startswith("members.0.")}
    w, m = sd["conv1.0.weight"], ens.members[0].conv1[0].weight.detach()
    found = [next(i for i, p in enumerate(w) if torch.equal(row, p)) for row in m]  # StopIteration: not inherited
    assert len(set(found)) == len(found)


def test_initial_checkpoint_of_a_split_continues_it(folder, distilled, tmp_path):
    """A checkpoint of S members initialises the split itself (--split must be that S)."""
    from timm_split.commands.train import build_model

    last = os.path.join(distilled, "last.safetensors")
    ens = build_model(_args(folder, tmp_path, "x", initial_checkpoint=last, split=2), 10, {"input_size": (3, 16, 16)})
    saved = _parent_weights(last)
    assert all(torch.equal(v, saved[k]) for k, v in ens.state_dict().items() if k in saved)
    with pytest.raises(ValueError, match="holds 2 members but --split is 4"):
        build_model(_args(folder, tmp_path, "x", initial_checkpoint=last, split=4), 10, {"input_size": (3, 16, 16)})


def _parent_weights(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_resume_reuses_the_teacher_and_refuses_another(folder, distilled, parent, runs, tmp_path):
    last = os.path.join(distilled, "last.safetensors")
    # the same teacher, at another path: accepted (identity is the file's digest)
    copy = tmp_path / "same.safetensors"
    shutil.copy(parent, copy)
    other = tmp_path / "other.safetensors"  # another teacher: the distilled ensemble itself
    shutil.copy(last, other)
    with pytest.raises(ValueError, match=r"was distilled from test_resnet .*sha256 .*another teacher"):
        train(_resume(folder, last, split=2, kd_model_checkpoint=str(other)), progress=False)
    with pytest.raises(ValueError, match="trained without a teacher"):
        train(_resume(folder, os.path.join(str(runs), "parent", "last.safetensors"), kd_model_checkpoint=parent),
              progress=False)
    # no --kd flags: the recorded teacher (and its temperature) is reused, and recorded again
    args = _resume(folder, last, split=2)
    train(args, progress=False)
    assert args.kd_temperature == 2.0 and args.kd_model_checkpoint == os.path.abspath(parent)
    state = _state(last)
    assert state["epoch"] == 2 and state["distill"]["teacher"]["sha256"] == file_sha256(parent)
    # the same teacher named explicitly by a copy: accepted (nothing left to train)
    train(_resume(folder, last, split=2, kd_model_checkpoint=str(copy)), progress=False)


def test_single_student_from_a_split_teacher(folder, distilled, tmp_path):
    """S=1 distilled from the S=2 ensemble (which teaches through its averaged output)."""
    teacher = os.path.join(distilled, "last.safetensors")
    args = _args(folder, tmp_path, "s1", kd_model_checkpoint=teacher, task_loss_weight=0.5)
    train(args, progress=False)
    state = _state(os.path.join(str(tmp_path), "s1", "last.safetensors"))
    assert state["split_factor"] == 1 and state["distill"]["teacher"]["split_factor"] == 2


def test_teacher_of_other_classes_is_refused(folder, tmp_path):
    """A timm state dict of 5 classes for students of 10: one line naming both counts."""
    import timm

    path = tmp_path / "t5.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), path)
    with pytest.raises(ValueError, match=r"--kd-model-checkpoint .*teacher has 5 classes but the students have 10"):
        train(_args(folder, tmp_path, "bad", kd_model_name="test_resnet", kd_model_checkpoint=str(path)),
              progress=False)
    with pytest.raises(ValueError, match="name its model with --kd-model-name"):
        train(_args(folder, tmp_path, "bad", kd_model_checkpoint=str(path)), progress=False)
    with pytest.raises(ValueError, match="needs --kd-model-checkpoint"):
        train(_args(folder, tmp_path, "bad", kd_model_name="test_resnet"), progress=False)


def test_flags_refused_before_any_work(folder, tmp_path):
    with pytest.raises(ValueError, match="--kd-distill-type feature: only 'logit'"):
        train(_args(folder, tmp_path, "x", kd_model_name="test_resnet", kd_distill_type="feature"), progress=False)
    with pytest.raises(ValueError, match="--kd-temperature must be"):
        DistillOptions(model_name="m", temperature=0)
    with pytest.raises(ValueError, match="--split-init inherit cuts the members from a trained model"):
        train(_args(folder, tmp_path, "x", split=2, split_init="inherit"), progress=False)


def test_weights_follow_timm_and_the_loss_is_timms_at_one_member():
    """timm's three weighting modes; at S=1 with no co-training, our loss is LogitDistillationTask's."""
    import timm
    from timm.task import DistillationTeacher, LogitDistillationTask

    assert DistillOptions().weights == (1.0, 1.0)
    assert DistillOptions(task_loss_weight=0.3).weights == (0.3, 0.7)
    assert DistillOptions(distill_loss_weight=2.0).weights == (1.0, 2.0)
    assert DistillOptions(distill_loss_weight=2.0, task_loss_weight=0.5).weights == (0.5, 2.0)
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=7).eval()
    teacher_net = timm.create_model("test_resnet", num_classes=7).eval()
    teacher_net.pretrained_cfg = dict(teacher_net.pretrained_cfg, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    task = LogitDistillationTask(student, DistillationTeacher(teacher_net), criterion=torch.nn.CrossEntropyLoss(),
                                 task_loss_weight=0.3, temperature=2.0, verbose=False)
    want = task(x, y)
    opts = DistillOptions(model_name="test_resnet", task_loss_weight=0.3, temperature=2.0)
    ours = DistillationLoss(CoTrainingLoss(cot_weight=0.0, warmup_epochs=0), opts)
    cfg = student.pretrained_cfg
    teacher = MemberTeacher(DistillationTeacher(teacher_net), cfg["mean"], cfg["std"])
    with torch.no_grad():
        got = ours(student(x)[None], y, teacher(x[None]), epoch=0.0)
    torch.testing.assert_close(got["kd"], want["kd_loss"])
    torch.testing.assert_close(got["ce"], want["task_loss"])
    torch.testing.assert_close(got["loss"], want["loss"])
