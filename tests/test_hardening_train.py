"""Hardening round 2 (issue 27): the trainer and validate never score the wrong images, and a bad flag is one
line (exit 2) before any work, with nothing written. Rows of docs/reliability.md name these tests."""
import json
import os

import pytest
from PIL import Image

from conftest import tiny_png_folder
from timm_split.commands.main import main as cli
from timm_split.commands.train import train_args
from timm_split.commands.train_checks import check_channels, check_train_args, warmup_warning
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
    (dict(seed=-1), "--seed must be"), (dict(threads=-1), "--threads must be"), (dict(std=[0.0]), "--std must be"),
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


# ---------------------------------------------------------------------------------------------------------
# validate

def test_validate_refuses_data_with_other_class_names(tmp_path):
    from timm_split.commands.validate import _check_classes  # noqa: PLC2701 - the module's own step, tested alone

    args = type("A", (), {"checkpoint": "c.safetensors", "data_dir": "d", "num_classes": None})()
    with pytest.raises(ValueError, match=r"other classes .*only in the checkpoint: \['b'\]; only in the data: \['c'\]"):
        _check_classes(args, {"class_names": ["a", "b"], "num_classes": 2}, ["a", "c"])
    assert _check_classes(args, {"class_names": ["a", "b"], "num_classes": 2}, ["a", "b"]) == 2


def test_validate_checks_results_file_and_img_size_before_any_work(tmp_path, capsys):
    ckpt = tmp_path / "none.safetensors"  # never read: the flags fail first
    assert cli(["validate", "--checkpoint", str(ckpt), "--results-file", str(tmp_path / "nodir" / "r.csv")]) == 2
    assert "--results-file" in capsys.readouterr().err
    assert cli(["validate", "--checkpoint", str(ckpt), "--img-size", "1"]) == 2
    assert "--img-size must be >= 8" in capsys.readouterr().err
