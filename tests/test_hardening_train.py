"""Hardening round 2 (issue 27): the trainer and validate never score the wrong images, and a bad flag is one
line (exit 2) before any work, with nothing written. Rows of docs/reliability.md name these tests."""
import json
import os
import shutil

import pytest
from PIL import Image

from conftest import tiny_png_folder
from timm_split.commands.main import main as cli
from timm_split.commands.train import train_args
from timm_split.commands.train_checks import check_channels, check_train_args, ema_warning, warmup_warning
from timm_split.training.data import EXPORT_MARKER, create_datasets, create_eval_dataset


def _folder(root, splits):
    """An ImageFolder: ``splits`` maps a split to its class names; two 8 px PNGs per class."""
    for split, classes in splits.items():
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return str(root)


# ---------------------------------------------------------------------------------------------------------
# never score the wrong images

def test_missing_validation_folder_is_an_error_not_the_root(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b"]})
    with pytest.raises(ValueError, match="no 'validation' folder .*--val-split"):
        create_datasets("", root)


def test_misspelt_val_split_is_an_error(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b"], "validation": ["a", "b"]})
    with pytest.raises(ValueError, match="no 'valdation' folder .*folders there: train, validation"):
        create_datasets("", root, val_split="valdation")
    assert len(create_datasets("", root, val_split="val")[1]) == 4  # timm's synonyms still find 'validation'


@pytest.mark.parametrize("val", [["a", "c"], ["a", "b", "c"], ["b"]])
def test_train_and_validation_classes_must_agree_by_name(tmp_path, val):
    root = _folder(tmp_path, {"train": ["a", "b"], "validation": val})
    with pytest.raises(ValueError, match="different classes"):
        create_datasets("", root)


def test_class_map_that_leaves_out_a_class_is_an_error(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b", "c"], "validation": ["a", "b", "c"]})
    cmap = tmp_path / "map.txt"
    cmap.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"leaves out the class folder\(s\) \['c'\]"):
        create_datasets("", root, class_map=str(cmap))


def test_partial_export_is_refused(tmp_path_factory):
    root = tiny_png_folder(tmp_path_factory)
    with open(os.path.join(root, EXPORT_MARKER)) as f:
        assert json.load(f)["complete"] is True  # a finished export says so last
    assert len(create_datasets("", root)[0]) > 0
    with open(os.path.join(root, EXPORT_MARKER), "w") as f:
        json.dump({"complete": False}, f)  # what a killed export leaves
    with pytest.raises(ValueError, match="partial export-fashion-mnist"):
        create_datasets("", root)
    with pytest.raises(ValueError, match="partial export-fashion-mnist"):
        create_eval_dataset("", root)


def test_export_with_a_missing_idx_dir_names_the_idx_flag_and_writes_nothing(tmp_path, capsys):
    assert cli(["export-fashion-mnist", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "nowhere")]) == 2
    assert "--idx-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# every flag checked before any work

BAD_FLAGS = [
    (dict(img_size=1), "--img-size must be"), (dict(drop_path=2.0), "--drop-path must be"),
    (dict(drop=1.5), "--drop must be"), (dict(reprob=2.0), "--reprob must be"), (dict(hflip=7.0), "--hflip must be"),
    (dict(train_subset=-3), "--train-subset must be"), (dict(train_subset=0), "--train-subset must be"),
    (dict(model_ema_decay=2.0), "--model-ema-decay must be"), (dict(validation_batch_size=0), "--validation-batch"),
    (dict(in_chans=0), "--in-chans must be"), (dict(crop_pct=0.0), "--crop-pct must be"),
    (dict(seed=-1), "--seed must be >= 0"),
    (dict(seed=2 ** 32), f"--seed must be >= 0 and <= {2 ** 32 - 2 ** 16 - 1}; got {2 ** 32}"),
    (dict(threads=-1), "--threads must be"), (dict(std=[0.0]), "--std must be"),
    (dict(eval_metric="top7"), "--eval-metric must be one of"), (dict(aa="bogus-policy"), "--aa 'bogus-policy'"),
    (dict(opt="adamw", opt_betas=[0.9]), "--opt adamw"), (dict(opt="nosuchopt"), "--opt nosuchopt"),
    (dict(sched="nosuchsched"), "--sched"), (dict(model_kwargs={"drop_rate": "abc"}), "--model-kwargs"),
    (dict(torchcompile="nosuchbackend"), "--torchcompile nosuchbackend"),
    (dict(class_map="missing.txt"), "--class-map missing.txt: no such file"), (dict(lr=1e400), "--lr must be"),
]


@pytest.mark.parametrize("overrides, message", BAD_FLAGS, ids=[str(o) for o, _ in BAD_FLAGS])
def test_bad_flag_is_refused_up_front(overrides, message):
    args = train_args(model="resnet18", split=2, **overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_train_args(args)


def test_channel_flags_must_fit_the_data():
    with pytest.raises(ValueError, match="--mean has 2 values for 3-channel images"):
        check_channels(train_args(mean=[0.5, 0.5]), 3)
    with pytest.raises(ValueError, match="--in-chans 1 but the data has 3-channel images"):
        check_channels(train_args(in_chans=1), 3)
    check_channels(train_args(mean=[0.5], std=[0.25, 0.25, 0.25]), 3)


def test_cli_bad_flag_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli(["train", "--model", "resnet18", "--split", "2", "--drop-path", "2", "--output", str(out),
                "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--drop-path must be" in err
    assert not out.exists()


def test_warmup_covering_the_whole_run_warns():
    assert "covers all --epochs 1" in warmup_warning(train_args(epochs=1, warmup_epochs=5))
    assert warmup_warning(train_args(epochs=5, warmup_epochs=1)) is None


def test_an_ema_that_cannot_move_in_the_run_is_warned():
    """The README's example once ran 35 updates with --model-ema (decay 0.9998): the evaluated EMA kept 99% of
    its initial weights and scored 10% (chance) while the model learnt."""
    assert "keeps 99% of the EMA's initial weights" in ema_warning(train_args(model_ema=True), 35)
    assert ema_warning(train_args(model_ema=True, model_ema_warmup=True), 35) is None
    assert ema_warning(train_args(model_ema=True), 100_000) is None
    assert ema_warning(train_args(), 35) is None


# ---------------------------------------------------------------------------------------------------------
# validate

def test_validate_refuses_data_with_other_class_names(tmp_path):
    from timm_split.commands.validate import check_class_names

    args = type("A", (), {"checkpoint": "c.safetensors", "data_dir": "d", "num_classes": None})()
    with pytest.raises(ValueError, match=r"other classes .*only in the checkpoint: \['b'\]; only in the data: \['c'\]"):
        check_class_names(args, {"class_names": ["a", "b"], "num_classes": 2}, ["a", "c"])
    assert check_class_names(args, {"class_names": ["a", "b"], "num_classes": 2}, ["a", "b"]) == 2


def test_validate_checks_results_file_and_img_size_before_any_work(tmp_path, capsys):
    ckpt = tmp_path / "none.safetensors"
    ckpt.write_bytes(b"")  # there (a missing one is named before the outputs), never read: the flags fail first
    assert cli(["validate", "--checkpoint", str(ckpt), "--results-file", str(tmp_path / "nodir" / "r.csv")]) == 2
    assert "--results-file" in capsys.readouterr().err
    assert cli(["validate", "--checkpoint", str(ckpt), "--img-size", "1"]) == 2
    assert "--img-size must be >= 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# issue 27, second part: one line naming the real cause, for the cases that were tracebacks or misleading

FAST = ["--model", "test_resnet", "--img-size", "32", "-b", "2", "-j", "0", "--device", "cpu", "--no-progress"]


def _one_line(capsys, argv, *needles, absent=()):
    code = cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    for n in absent:
        assert n not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-class folder and one finished S=2 test_resnet run on it (1 epoch, 2 updates): (data, run folder)."""
    root = tmp_path_factory.mktemp("data")
    data = _folder(root, {"train": ["a", "b"], "validation": ["a", "b"]})
    out = tmp_path_factory.mktemp("runs")
    assert cli(["train", "--data-dir", data, "--split", "2", "--epochs", "1", "--output", str(out), "--experiment",
                "r", *FAST]) == 0
    return data, os.path.join(out, "r")


def test_ema_flag_named_per_command(trained, tmp_path, capsys):
    data, run = trained
    last = os.path.join(run, "last.safetensors")
    _one_line(capsys, ["train", "--data-dir", data, "--split", "2", "--epochs", "2", "--model-ema", "--resume", last,
                       "--output", str(tmp_path), *FAST], "no EMA weights", "drop --model-ema", absent=["--use-ema"])
    _one_line(capsys, ["validate", "--checkpoint", last, "--data-dir", data, "--use-ema", "--device", "cpu"],
              "no EMA weights", "drop --use-ema", absent=["--model-ema"])


def test_validate_on_an_empty_or_missing_folder_names_the_validation_split(trained, tmp_path, capsys):
    _, run = trained
    ckpt = ["validate", "--checkpoint", os.path.join(run, "last.safetensors"), "--device", "cpu", "--data-dir"]
    _one_line(capsys, ckpt + [str(tmp_path)], "it holds no folders", "validation/<class>", absent=["train"])
    _one_line(capsys, ckpt + [str(tmp_path / "none")], "DIR/validation/<class>", absent=["train"])
    (tmp_path / "validation" / "a").mkdir(parents=True)
    _one_line(capsys, ckpt + [str(tmp_path)], "Found 0 images", "put the images in", absent=["nothing is downloaded"])


def test_classifier_mismatch_names_the_checkpoints_class_count(tmp_path, capsys):
    import timm
    import timm_split  # noqa: F401 - registers splitnet_*
    from timm_split.checkpoint import load_checkpoint, save_checkpoint

    path = str(tmp_path / "two.safetensors")
    save_checkpoint(timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=2), path)
    five = timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=5)
    with pytest.raises(ValueError, match=r"two.safetensors has 2 classes but the model was built with 5 .*"
                                         r"num_classes=2"):
        load_checkpoint(five, path)
    data = _folder(tmp_path / "d", {"validation": ["a", "b"]})
    _one_line(capsys, ["validate", "--checkpoint", path, "--model", "splitnet_test_resnet", "--split", "2",
                       "--num-classes", "5", "--data-dir", data, "--device", "cpu"],
              "--num-classes 5 but", "has 2 classes")


def test_a_plain_state_dict_loads_into_one_member_and_names_the_prefix_otherwise(tmp_path, capsys):
    import timm
    import torch
    import timm_split
    from timm_split.checkpoint import load_checkpoint

    base = timm.create_model("test_resnet", num_classes=2)
    path = str(tmp_path / "plain.pth")
    torch.save(base.state_dict(), path)
    one = timm_split.split(timm.create_model("test_resnet", num_classes=2), 1)
    load_checkpoint(one, path)
    torch.testing.assert_close(one.members[0].fc.weight, base.fc.weight)
    with pytest.raises(ValueError, match=r"one model's own state dict .*'members.<i>.' prefix.*--split 1"):
        load_checkpoint(timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=2), path)
    data = _folder(tmp_path / "d", {"validation": ["a", "b"]})
    argv = ["validate", "--checkpoint", path, "--model", "test_resnet", "--num-classes", "2", "--data-dir", data,
            "--device", "cpu", "--split"]
    assert cli(argv + ["1"]) == 0
    _one_line(capsys, argv + ["2"], "'members.<i>.' prefix", absent=["architecture"])


def test_export_names_the_missing_idx_folder(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    _one_line(capsys, ["export-fashion-mnist", str(tmp_path / "out"), "--idx-dir", missing],
              f"--idx-dir {missing}: no such folder", absent=["--data-dir"])
    assert not (tmp_path / "out").exists()


def test_nan_loss_is_one_line_and_keeps_the_checkpoints(trained, tmp_path, capsys):
    data, run = trained
    shutil.copytree(run, tmp_path / "r")
    before = {f: (tmp_path / "r" / f).read_bytes() for f in os.listdir(tmp_path / "r") if f.endswith(".safetensors")}
    _one_line(capsys, ["train", "--data-dir", data, "--split", "2", "--epochs", "2", "--lr", "1e30",
                       "--warmup-epochs", "0", "--resume", str(tmp_path / "r" / "last.safetensors"), "--output",
                       str(tmp_path), "--experiment", "r", *FAST], "loss is nan at epoch 1 (2 of 2)", "lower --lr")
    after = {f: (tmp_path / "r" / f).read_bytes() for f in os.listdir(tmp_path / "r") if f.endswith(".safetensors")}
    assert after == before


def test_an_image_over_pils_limit_is_named(tmp_path, capsys, monkeypatch):
    data = _folder(tmp_path, {"train": ["a", "b"], "validation": ["a", "b"]})
    big = tmp_path / "train" / "b" / "big.png"
    Image.new("RGB", (64, 64)).save(big)  # 4096 px: over 2 * 1500, where PIL refuses; the 37 px resize is not
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "2.png")  # 6 images: no batch of 2 is dropped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    _one_line(capsys, ["train", "--data-dir", data, "--split", "2", "--epochs", "1", "--output", str(tmp_path / "o"),
                       *FAST], str(big), "decompression bomb", "PIL.Image.MAX_IMAGE_PIXELS (now 1500")


def test_a_seed_past_42947_trains(tmp_path, capsys):
    """Every epoch reseeds numpy with seed * 100003 + epoch: that wraps around now (numpy refused it past 2**32)."""
    data = _folder(tmp_path, {"train": ["a", "b"], "validation": ["a", "b"]})
    assert cli(["train", "--data-dir", data, "--split", "1", "--epochs", "1", "--seed", "50000", "--output",
                str(tmp_path / "o"), *FAST]) == 0


def test_model_kwargs_check_runs_the_model_at_the_size_it_was_built_for():
    """``--model-kwargs img_size=64`` on a ViT: the up-front meta forward uses 64 px, not the cfg's 224 (it refused
    a good flag)."""
    check_train_args(train_args(model="vit_tiny_patch16_224", model_kwargs={"img_size": 64}, img_size=64))
