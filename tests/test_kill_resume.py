"""SIGKILL at every checkpoint write point in turn, then --resume: the final weights are bit-identical."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import timm_split
from timm_split.training.data import export_fashion_mnist

from conftest import fake_fashion_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(timm_split.__file__)))
# the child counts os.replace / os.link calls (every checkpoint, summary-free write point) and dies at the k-th
CHILD = """
import atexit, os, signal, sys
k, n = int(os.environ["KILL_AT"]), [0]
def wrap(f):
    def g(*a, **kw):
        n[0] += 1
        if n[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return f(*a, **kw)
    return g
os.replace, os.link = wrap(os.replace), wrap(os.link)
atexit.register(lambda: open(os.environ["COUNT_FILE"], "w").write(str(n[0])))
from timm_split.commands.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train(folder, out, kill_at, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, KILL_AT=str(kill_at),
               COUNT_FILE=os.path.join(str(out), "count"))
    flags = ["--data-dir", folder, "--model", "test_resnet", "--split", "2", "--img-size", "28", "--epochs", "2",
             "-b", "8", "-j", "0", "--lr", "0.05", "--warmup-epochs", "0", "--model-ema", "--mixup", "0.2",
             "--checkpoint-hist", "1", "--output", str(out), "--experiment", "r", "--device", "cpu", "--no-progress",
             "--execution", "loop"]  # a fresh rerun (a kill before the first checkpoint) must not re-time auto
    return subprocess.run([sys.executable, "-c", CHILD, *flags, *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_at_every_write_then_resume(tmp_path):
    os.makedirs(tmp_path / "idx")
    idx = fake_fashion_idx(tmp_path / "idx", 4, 2)
    folder = str(tmp_path / "png")
    export_fashion_mnist(folder, idx_dir=idx)
    ref = tmp_path / "ref"
    os.makedirs(ref)
    assert _train(folder, ref, 0).returncode == 0
    writes = int(open(ref / "count").read())
    assert writes >= 8
    expected = load_file(ref / "r" / "last.safetensors")
    summary = open(ref / "r" / "summary.csv").read()
    files = sorted(f for f in os.listdir(ref / "r") if f.endswith(".safetensors"))
    for k in range(1, writes + 1):
        out = tmp_path / f"kill{k}"
        os.makedirs(out)
        assert _train(folder, out, k).returncode == -9, k
        last = out / "r" / "last.safetensors"
        extra = ["--resume", str(last)] if last.exists() else []
        proc = _train(folder, out, 0, *extra)
        assert proc.returncode == 0, (k, proc.stderr[-2000:])
        got = load_file(last)
        assert got.keys() == expected.keys(), k
        assert all(torch.equal(got[n], expected[n]) for n in expected), (
            k, [n for n in expected if not torch.equal(got[n], expected[n])][:3])
        assert open(out / "r" / "summary.csv").read() == summary, k
        assert sorted(f for f in os.listdir(out / "r") if f.endswith(".safetensors")) == files, k
