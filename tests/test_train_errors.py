"""`timm-split train` / `validate`: a user error exits 2 with one line that names the cause and the fix."""
import os

import pytest
import torch

from timm_split.commands.main import main

from conftest import tiny_png_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_png_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def run_dir(folder, tmp_path_factory):
    """One finished S=2 test_resnet run."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_train(folder, out, "--split", "2")) == 0
    return os.path.join(out, "r")


def _train(folder, out, *extra):
    return ["train", "--data-dir", folder, "--model", "test_resnet", "--img-size", "28", "--epochs", "1", "-b", "8",
            "-j", "0", "--output", str(out), "--experiment", "r", "--no-progress", "--device", "cpu", *extra]


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_flag(folder, tmp_path, capsys):
    _one_line_error(capsys, _train(folder, tmp_path, "--lr-warmup", "3"), "unknown flag", "--lr-warmup", "--help")


def test_unknown_model_before_the_data(tmp_path, capsys):
    # the data dir does not exist either: the model is checked first, so the model is what the error names
    _one_line_error(capsys, _train(str(tmp_path / "none"), tmp_path) + ["--model", "resnet_nope"],
                    "unknown --model 'resnet_nope'", "list_models")


def test_output_under_a_file(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, _train(folder, tmp_path / "file" / "sub"), "is a file", "folder")


@pytest.mark.parametrize("flag,value,needle", [("--lr", "nan", "--lr must be a finite number"),
                                               ("--lr", "-1", "--lr must be a finite number"),
                                               ("--split", "0", "--split must be >= 1"),
                                               ("--cot-weight", "inf", "--cot-weight must be a finite")])
def test_bad_numbers(folder, tmp_path, capsys, flag, value, needle):
    _one_line_error(capsys, _train(folder, tmp_path, flag, value), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(folder, tmp_path, capsys):
    _one_line_error(capsys, _train(folder, tmp_path) + ["--device", "cuda"], "no CUDA GPU", "--device cpu")


def test_model_kwargs_bad_key(folder, tmp_path, capsys):
    _one_line_error(capsys, _train(folder, tmp_path, "--model-kwargs", "bogus_key=1"), "bogus_key", "--model-kwargs")


def test_missing_data_dir(tmp_path, capsys):
    _one_line_error(capsys, _train(str(tmp_path / "nope"), tmp_path), "does not exist", "--data-dir")


def test_folder_without_images(tmp_path, capsys):
    for split in ("train", "validation"):
        os.makedirs(tmp_path / "empty" / split / "a")
    _one_line_error(capsys, _train(str(tmp_path / "empty"), tmp_path / "o"), "Found 0 images", "--data-dir")


def test_class_count_mismatch(folder, tmp_path, capsys):
    _one_line_error(capsys, _train(folder, tmp_path, "--num-classes", "7"), "--num-classes 7", "10 classes")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a checkpoint at all"])
def test_resume_unreadable_checkpoint(folder, tmp_path, capsys, content):
    bad = tmp_path / "last.safetensors"
    bad.write_bytes(content)
    _one_line_error(capsys, _train(folder, tmp_path / "o", "--resume", str(bad)), str(bad), "another checkpoint")


def test_resume_truncated_checkpoint(folder, run_dir, tmp_path, capsys):
    data = open(os.path.join(run_dir, "last.safetensors"), "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    _one_line_error(capsys, _train(folder, tmp_path / "o", "--split", "2", "--resume", str(cut)), str(cut))


def test_resume_damaged_checkpoint_fails_the_checksum(folder, run_dir, tmp_path, capsys):
    data = bytearray(open(os.path.join(run_dir, "last.safetensors"), "rb").read())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    _one_line_error(capsys, _train(folder, tmp_path / "o", "--split", "2", "--resume", str(bad)), "checksum", str(bad))


def test_resume_with_another_split_or_model(folder, run_dir, tmp_path, capsys):
    last = os.path.join(run_dir, "last.safetensors")
    _one_line_error(capsys, _train(folder, tmp_path / "a", "--split", "4", "--resume", last),
                    "checkpoint has 2 members", "--split 2")
    _one_line_error(capsys, _train(folder, tmp_path / "b", "--split", "2", "--model", "test_efficientnet",
                                   "--resume", last), "does not match splitnet_test_efficientnet", "--model")


def test_resume_with_a_corrupt_summary(folder, run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "summary.csv").write_text("epoch,train_loss\nbanana,1\n")
    _one_line_error(capsys, _train(folder, tmp_path / "o", "--split", "2", "--epochs", "2", "--resume",
                                   str(copy / "last.safetensors"), "--output", "", "--experiment", ""),
                    "summary.csv is corrupt")


def test_validate_errors(folder, run_dir, tmp_path, capsys):
    last = os.path.join(run_dir, "last.safetensors")
    _one_line_error(capsys, ["validate", "--checkpoint", str(tmp_path / "none.safetensors"), "--data-dir", folder],
                    "no checkpoint at")
    _one_line_error(capsys, ["validate", "--checkpoint", last, "--data-dir", folder, "--split", "4"],
                    "checkpoint has 2 members")
    _one_line_error(capsys, ["validate", "--checkpoint", last, "--data-dir", folder, "--use-ema"], "no EMA weights")


def test_torch_dataset_not_on_disk_is_not_downloaded(tmp_path, capsys):
    _one_line_error(capsys, _train(str(tmp_path), tmp_path / "o", "--dataset", "torch/cifar10"),
                    "torch/cifar10", "nothing is downloaded")
    assert os.listdir(tmp_path) == []
