"""Hardening (issue 27): a run folder belongs to one run. `timm-split train` locks it, never overwrites a finished
run with a fresh one, removes the temp files a kill left, and a full or read-only disk is one line (exit 2) with
the last checkpoint intact. Rows of docs/reliability.md name these tests."""
import contextlib
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


# ---------------------------------------------------------------------------------------------------------
# a run ended by SIGTERM or SIGKILL, then the next run in its folder

def _train_until_epoch_0_is_done(folder, out):
    """`timm-split train` (2 loader workers, forked) in a child process, once its epoch 0 is checkpointed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "timm_split.commands.train", *_flags(folder, out)[1:],
                             "--epochs", "500", "-j", "2", "--execution", "loop", "--log-interval", "1"],
                            cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the module run with -m logs its INFO lines too
        lines.append(line)
        if "Train: 1 [" in line:
            return proc, lines
    proc.wait()
    raise AssertionError("".join(lines[-20:]))


@pytest.mark.timeout(180)
def test_sigterm_releases_the_lock_and_says_how_to_go_on(folder, tmp_path):
    import signal

    proc, _ = _train_until_epoch_0_is_done(folder, tmp_path)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, err
    last = tmp_path / "r" / "last.safetensors"
    assert err.strip().splitlines()[-1] == (f"timm-split train: stopped by SIGTERM; {tmp_path / 'r' / LOCK_FILE} "
                                            f"released; --resume {last} continues the run"), err
    assert "Traceback" not in err and not (tmp_path / "r" / LOCK_FILE).exists()
    assert _epoch(last) == 1


@pytest.mark.timeout(180)
def test_sigkill_frees_the_folder_at_once_though_its_loader_workers_live_on(folder, tmp_path, caplog):
    """An flock belongs to the open file, which forked loader workers share: they used to keep the folder locked
    for seconds after the trainer's SIGKILL (until they noticed), and a rerun then was refused."""
    import signal

    proc, _ = _train_until_epoch_0_is_done(folder, tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # the trainer is gone; its workers may not be yet
    assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == str(proc.pid)  # SIGKILL leaves the file
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        RunLock(str(tmp_path / "r"), wait_dead=0).acquire().release()  # no wait: free the moment the trainer died
    assert f"took over {tmp_path / 'r' / LOCK_FILE} from pid {proc.pid}" in caplog.text
    proc.stderr.close()


def test_a_dead_pids_lock_held_by_a_process_it_started_is_waited_for_then_refused(tmp_path, caplog):
    import fcntl

    run = tmp_path / "r"
    os.makedirs(run)
    dead = _dead_pid()
    (run / LOCK_FILE).write_text(f"{dead}\n")
    child = os.open(run / LOCK_FILE, os.O_RDWR)  # what a child of the dead trainer would still hold
    fcntl.flock(child, fcntl.LOCK_EX)
    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    try:
        with caplog.at_level(logging.WARNING, logger="timm_split"):
            with pytest.raises(ValueError) as info:
                RunLock(str(run), wait_dead=1.0, clock=lambda: now[0], sleep=sleep).acquire()
        assert f"pid {dead}, which locked it, has ended; waiting up to 1s" in caplog.text
        assert sum(waits) == pytest.approx(1.0) and f"fuser {run / LOCK_FILE}" in str(info.value)
        assert f"though pid {dead} that took it has ended" in str(info.value)

        def sleep_then_let_go(seconds):  # the child exits during the wait: the lock is taken over
            os.close(child)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="timm_split"):
            lock = RunLock(str(run), wait_dead=1.0, clock=lambda: now[0], sleep=sleep_then_let_go).acquire()
        lock.release()
        assert f"from pid {dead}" in caplog.text
    finally:
        with contextlib.suppress(OSError):
            os.close(child)


def test_a_live_holder_is_refused_at_once_naming_the_lock_and_the_fix(tmp_path):
    os.makedirs(tmp_path / "r")
    lock = RunLock(str(tmp_path / "r")).acquire()
    try:
        with pytest.raises(ValueError) as info:
            RunLock(str(tmp_path / "r"), sleep=lambda s: pytest.fail("waited for a live holder")).acquire()
    finally:
        lock.release()
    message = str(info.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and str(tmp_path / "r" / LOCK_FILE) in message
    assert "wait for it to end, or pass another --experiment or --output" in message


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    os.makedirs(tmp_path / "r")
    lock = RunLock(str(tmp_path / "r")).acquire()
    read, write = os.pipe()
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (a loader worker): its copy of the lock's descriptor is closed
        try:
            os.write(started_w, b"x")  # the fork hooks have run
            os.read(read, 1)  # until the parent has let go
            lock.release()  # a no-op in the child: the file is the parent's
        finally:
            os._exit(0)
    try:
        os.read(started_r, 1)
        os.close(lock._fd)  # the parent's descriptor closed (as a SIGKILL would): the child holds no copy
        lock._fd = None
        RunLock(str(tmp_path / "r"), wait_dead=0).acquire().release()
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)
        for fd in (read, write, started_r, started_w):
            os.close(fd)
