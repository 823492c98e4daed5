"""torchrun with 2 gloo processes on the CPU: DDP over the data, and --member-parallel (one member per rank)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import timm_split
from timm_split.commands.train import train, train_args

from conftest import tiny_png_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(timm_split.__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_png_folder(tmp_path_factory)


def _flags(folder, out, name):
    return ["--data-dir", folder, "--model", "test_resnet", "--split", "2", "--img-size", "28", "--epochs", "1",
            "-b", "8", "-j", "0", "--lr", "0.05", "--warmup-epochs", "0", "--seed", "0", "--output", str(out),
            "--experiment", name, "--device", "cpu", "--no-progress"]


def _torchrun(flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "timm_split.commands.train", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(900)
def test_member_parallel_trains_as_one_process(folder, tmp_path):
    """Each rank trains its member on its own view; the all-gathered JS term gives single-process co-training."""
    _torchrun(_flags(folder, tmp_path, "mp") + ["--member-parallel"])
    single = train(train_args(data_dir=folder, model="test_resnet", split=2, img_size=28, epochs=1, batch_size=8,
                              workers=0, lr=0.05, warmup_epochs=0, seed=0, output=str(tmp_path), experiment="one",
                              device="cpu"), progress=False)
    assert single["final"] is not None
    rows = [open(os.path.join(tmp_path, name, "summary.csv")).read().splitlines()[1].split(",")
            for name in ("mp", "one")]
    assert float(rows[0][1]) == pytest.approx(float(rows[1][1]), rel=1e-5)  # train loss, JS term included
    assert float(rows[0][3]) == pytest.approx(float(rows[1][3]), rel=1e-4) and float(rows[1][3]) > 0
    a = load_file(os.path.join(tmp_path, "mp", "last.safetensors"))
    b = load_file(os.path.join(tmp_path, "one", "last.safetensors"))
    for k in b:  # float drift of a different reduction order over 5 SGD steps, not a different update
        if not k.startswith("_train."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=2e-3, msg=k)


@pytest.mark.timeout(900)
def test_ddp_two_ranks(folder, tmp_path):
    proc = _torchrun(_flags(folder, tmp_path, "ddp"))
    run = os.path.join(tmp_path, "ddp")
    assert sorted(os.listdir(run)) == ["args.json", "checkpoint-0.safetensors", "last.safetensors",
                                       "model_best.safetensors", "results.json", "summary.csv"]
    with open(os.path.join(run, "summary.csv")) as f:
        assert len(f.read().splitlines()) == 2  # rank 0 alone writes: a header and one epoch
    assert proc.stdout.count("test_resnet S=2: top-1") == 1
