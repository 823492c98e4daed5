"""Hardening (issue 27): a run folder belongs to one run. `timm-split train` locks it, never overwrites a finished
run with a fresh one, removes the temp files a kill left, and a full or read-only disk is one line (exit 2) with
the last checkpoint intact. Rows of docs/reliability.md name these tests."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import timm_split.commands.train as tr
from conftest import tiny_png_folder
from timm_split.checkpoint import read_metadata
from timm_split.commands.main import main
from timm_split.commands.run_folder import LOCK_FILE, RunLock


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_png_folder(tmp_path_factory)


def _flags(folder, out, *extra):
    return ["train", "--data-dir", folder, "--model", "test_resnet", "--img-size", "16", "--epochs", "1", "-b", "8",
            "-j", "0", "--warmup-epochs", "0", "--output", str(out), "--experiment", "r", "--no-progress",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """One finished 1-epoch run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_flags(folder, out)) == 0
    return os.path.join(out, "r")


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    return tmp_path / "r"


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _epoch(path):
    return json.loads(read_metadata(path)["state"])["epoch"]


# ---------------------------------------------------------------------------------------------------------
# a full or read-only disk

def test_disk_full_during_a_checkpoint_exits_2_and_keeps_the_last(folder, finished, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    run = _copy(finished, tmp_path)
    good = open(run / "last.safetensors", "rb").read()

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = main(_flags(folder, tmp_path, "--epochs", "2", "--resume", str(run / "last.safetensors")))
    err = _one_line(capsys)
    assert code == 2 and str(run / "last.safetensors") in err and "No space left on device" in err, err
    assert open(run / "last.safetensors", "rb").read() == good and _epoch(run / "last.safetensors") == 1
    assert not [f for f in os.listdir(run) if "tmp" in f or f == LOCK_FILE], os.listdir(run)


@pytest.mark.parametrize("name, code", [("args.json", errno.EROFS), ("results.json", errno.ENOSPC)])
def test_read_only_or_full_disk_on_a_json_file_names_it(folder, tmp_path, monkeypatch, capsys, name, code):
    real = json.dump

    def dump(obj, fp, **kw):
        if os.path.basename(fp.name).startswith(name):
            raise OSError(code, os.strerror(code))
        return real(obj, fp, **kw)
    monkeypatch.setattr(json, "dump", dump)
    assert main(_flags(folder, tmp_path)) == 2
    err = _one_line(capsys)
    assert str(tmp_path / "r" / name) in err and os.strerror(code) in err, err
    left = os.listdir(tmp_path / "r")
    assert not [f for f in left if "tmp" in f or f == LOCK_FILE], left
    if name == "results.json":  # the checkpoint of the finished epoch is intact
        assert _epoch(tmp_path / "r" / "last.safetensors") == 1


# ---------------------------------------------------------------------------------------------------------
# stale temp files

def test_temp_files_a_kill_left_are_removed_on_the_next_start(folder, tmp_path):
    run = tmp_path / "r"
    os.makedirs(run)
    dead, live = _dead_pid(), os.getppid()
    stale = [f"args.json.{dead}.tmp", f"results.json.{dead}.tmp", f"last.safetensors.{dead}.tmp",
             "checkpoint-0.safetensors.tmp", "tmp.safetensors", ".tmpAb12Cd"]
    kept = [f"args.json.{live}.tmp", "notes.tmp", "mine.txt"]  # a live pid's, and files not of our naming
    for f in stale + kept:
        (run / f).write_bytes(b"x")
    assert main(_flags(folder, tmp_path)) == 0
    left = set(os.listdir(run))
    assert not left & set(stale) and set(kept) <= left


# ---------------------------------------------------------------------------------------------------------
# one run per folder

def test_second_trainer_on_the_folder_gets_the_pid(folder, tmp_path, capsys):
    os.makedirs(tmp_path / "r")
    lock = RunLock(str(tmp_path / "r")).acquire()  # what a running trainer holds
    try:
        assert main(_flags(folder, tmp_path)) == 2
        err = _one_line(capsys)
        assert f"in use by another trainer (pid {os.getpid()}" in err and "--experiment" in err, err
        assert os.listdir(tmp_path / "r") == [LOCK_FILE]  # nothing written
    finally:
        lock.release()
    RunLock(str(tmp_path / "r")).acquire().release()  # free again once its holder releases it
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(folder, tmp_path, caplog):
    os.makedirs(tmp_path / "r")
    dead = _dead_pid()
    (tmp_path / "r" / LOCK_FILE).write_text(f"{dead}\n")
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        assert main(_flags(folder, tmp_path)) == 0
    assert f"from pid {dead}" in caplog.text
    assert (tmp_path / "r" / "last.safetensors").exists() and not (tmp_path / "r" / LOCK_FILE).exists()


def test_fresh_run_never_overwrites_a_finished_run(folder, finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    before = {f: open(run / f, "rb").read() for f in os.listdir(run)}
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        results = tr.train(tr.train_args(data_dir=folder, model="test_resnet", img_size=16, epochs=1, batch_size=4,
                                         workers=0, warmup_epochs=0, output=str(tmp_path), experiment="r",
                                         device="cpu"), progress=False)
    assert results["output"] == str(tmp_path / "r-1") and str(tmp_path / "r-1") in caplog.text
    assert {f: open(run / f, "rb").read() for f in os.listdir(run)} == before
    assert (tmp_path / "r-1" / "last.safetensors").exists()


def test_resume_continues_in_place_holding_the_lock(folder, finished, tmp_path, monkeypatch):
    run = _copy(finished, tmp_path)
    real, tried = tr.train_one_epoch, []

    def epoch_checking_the_lock(*a, **kw):
        with pytest.raises(ValueError, match="in use by another trainer"):
            RunLock(str(run)).acquire()
        tried.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(tr, "train_one_epoch", epoch_checking_the_lock)
    results = tr.train(tr.train_args(data_dir=folder, model="test_resnet", img_size=16, epochs=2, batch_size=8,
                                     workers=0, warmup_epochs=0, device="cpu", resume=str(run / "last.safetensors")),
                       progress=False)
    assert tried == [1] and results["output"] == str(run)
    assert _epoch(run / "last.safetensors") == 2 and (run / "checkpoint-1.safetensors").exists()
    assert not (tmp_path / "r-1").exists() and not (run / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------
# resuming with another optimizer

def test_resume_sgd_run_with_adamw_is_one_line_and_changes_nothing(folder, tmp_path, capsys):
    assert main(_flags(folder, tmp_path, "--opt", "sgd")) == 0
    last = tmp_path / "r" / "last.safetensors"
    good = open(last, "rb").read()
    assert main(_flags(folder, tmp_path, "--opt", "adamw", "--epochs", "2", "--resume", str(last))) == 2
    err = _one_line(capsys)
    assert "SGD optimizer" in err and "AdamW" in err and "--no-resume-opt" in err and "--opt" in err, err
    assert open(last, "rb").read() == good
    assert main(_flags(folder, tmp_path, "--opt", "adamw", "--epochs", "2", "--resume", str(last),
                       "--no-resume-opt")) == 0
    assert _epoch(last) == 2


def test_a_full_disk_when_taking_the_lock_names_the_lock_file(tmp_path, monkeypatch):
    """os.write's ENOSPC carries no file name: the lock names its file (found by the campaign on a real tmpfs,
    where the message said 'cannot write the run folder')."""
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        RunLock(str(tmp_path)).acquire()
    assert info.value.errno == errno.ENOSPC and info.value.filename == os.path.join(str(tmp_path), LOCK_FILE)
