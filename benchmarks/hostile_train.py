"""Hostile-input campaign on the trainer, validate and checkpoints (issue 27), rerunnable.

    python benchmarks/hostile_train.py                  # every case; prints a table and the counts per outcome
    python benchmarks/hostile_train.py -k resume --json docs/hostile_train.json

Each case runs ``timm-split ...`` (or a short Python snippet) in a subprocess, in a fresh folder, on tiny data
(two classes of 8 random 32 px PNGs, the issue's setting), and is classified:

* ``ok``: what the case expects (a user error is exit 2 with one line that names the cause; a run that should
  work exits 0 and leaves the files it should);
* ``silent``: exit 0 where the input is wrong (a silent wrong result);
* ``traceback``: a Python traceback for a user error;
* ``unclear``: exit 2 and one line, but the line does not name the cause (the case's pattern);
* ``data-loss``: a file the user had was changed or lost.

The cases are the issue's, grouped as there, plus new ones of the same kinds (marked ``new``).
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

from PIL import Image

from common import image_folder, write_json

T = ["--model", "test_resnet", "--split", "2", "--img-size", "32", "--epochs", "1", "-b", "4", "-j", "0",
     "--device", "cpu", "--output", "runs", "--no-progress"]
CLI = [sys.executable, "-m", "timm_split.commands.main"]


AB = {"train": ["a", "b"], "validation": ["a", "b"]}
FLAG_NAMES = {"-vb": "--validation-batch-size"}  # a short flag's message names its long form
NEW_FLAGS = {"--epochs", "--mixup", "--smoothing", "--lr", "--split"}  # cases of our own, not the issue's


class Case:
    """One hostile input: ``setup(dir)`` prepares files and returns the command (argv after ``timm-split``, or
    ``["python", code]``); ``expect`` is ``'error'`` (with ``pattern`` to find in the one line) or ``'ok'``
    (with ``check(dir, stdout, stderr)`` returning a failure text or None); ``keep`` lists files that must survive
    unchanged."""

    def __init__(self, group: str, name: str, setup: Callable[[str], List[str]], expect: str = "error",
                 pattern: str = "", check: Optional[Callable[[str, str, str], Optional[str]]] = None,
                 keep: tuple = (), new: bool = False):
        self.group, self.name, self.setup, self.expect, self.pattern = group, name, setup, expect, pattern
        self.check, self.keep, self.new = check, keep, new


def train_cmd(*extra: str, splits=AB) -> Callable[[str], List[str]]:
    def setup(d: str) -> List[str]:
        image_folder(os.path.join(d, "data"), splits)
        return ["train", "--data-dir", "data", *T, *extra]
    return setup


# a finished base run, made once and copied into the cases that need one
BASE: Dict[str, str] = {}


def base_run(d: str, *extra: str) -> str:
    """Copy (or make) a finished 1-epoch run into ``d/runs/base``; return its last checkpoint's path."""
    key = " ".join(extra)
    if key not in BASE:
        src = tempfile.mkdtemp(prefix="hostile-base-")
        image_folder(os.path.join(src, "data"), AB)
        subprocess.run(CLI + ["train", "--data-dir", "data", *T, "--experiment", "base", *extra], cwd=src,
                       check=True, capture_output=True)
        BASE[key] = src
    shutil.copytree(BASE[key], d, dirs_exist_ok=True)
    return os.path.join("runs", "base", "last.safetensors")


def edit_metadata(path: str, fn: Callable[[Dict[str, str]], None]) -> None:
    """Rewrite a safetensors file's header metadata with ``fn`` (tensors untouched, checksum not updated)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header.setdefault("__metadata__", {}))
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    # tensor offsets are relative to the end of the header, so the data is unchanged
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def resume_case(edit: Callable[[str], None], *extra: str) -> Callable[[str], List[str]]:
    def setup(d: str) -> List[str]:
        ck = base_run(d)
        edit(os.path.join(d, ck))
        return ["train", "--data-dir", "data", *T, "--epochs", "3", "--resume", ck, *extra]
    return setup


def _state(fn):
    def edit(meta):
        st = json.loads(meta["state"])
        fn(st)
        meta["state"] = json.dumps(st)
    return edit


def flip_state_byte(path: str) -> None:
    """Flip the low bit of the epoch digit in the state metadata (a bit error where it matters: 1 -> 0)."""
    with open(path, "rb") as f:
        raw = f.read()
    at = raw.index(b'\\"epoch\\": ') + len(b'\\"epoch\\": ')
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0x01]))


def _optim_lr(meta):
    key = next(k for k in meta if "optim" in k)
    meta[key] = meta[key].replace('"lr": ', '"lr": 123.0, "_was": ', 1)


def bomb_png(d: str) -> List[str]:
    image_folder(os.path.join(d, "data"), AB)
    Image.new("1", (14000, 14000)).save(os.path.join(d, "data", "train", "a", "big.png"))
    return ["train", "--data-dir", "data", *T]


def class_map_case(d: str) -> List[str]:
    with open(os.path.join(d, "m.txt"), "w") as f:
        f.write("a\n")
    return train_cmd("--class-map", "m.txt")(d)


def resume_folder(d: str) -> List[str]:
    base_run(d)
    return ["train", "--data-dir", "data", *T, "--resume", "runs/base"]


def py(code: str) -> Callable[[str], List[str]]:
    return lambda d: ["python", code]


def validate_cmd(*extra: str, splits=AB, base_extra: tuple = ()) -> Callable[[str], List[str]]:
    def setup(d: str) -> List[str]:
        ck = base_run(d, *base_extra)
        if splits is not AB:
            shutil.rmtree(os.path.join(d, "data"))
            image_folder(os.path.join(d, "data"), splits)
        return ["validate", "--checkpoint", ck, "--data-dir", "data", "-j", "0", "--device", "cpu", *extra]
    return setup


def stale_tmp(d: str) -> List[str]:
    ck = base_run(d)
    for name in ("args.json.99999999.tmp", "results.json.99999998.tmp"):
        open(os.path.join(d, "runs", "base", name), "w").write("{")
    return ["train", "--data-dir", "data", *T, "--epochs", "2", "--resume", ck, "--experiment", "base"]


def no_tmp_left(d: str, out: str, err: str) -> Optional[str]:
    left = [f for f in os.listdir(os.path.join(d, "runs", "base")) if f.endswith(".tmp")]
    return f"stale temp files left: {left}" if left else None


HOLDERS: List[subprocess.Popen] = []  # processes a case leaves running (killed after it)
HOLD_LOCK = ("import sys, time; from timm_split.commands.run_folder import RunLock; RunLock('runs/base').acquire(); "
             "print('locked', flush=True); time.sleep(120)")


def second_trainer(d: str) -> List[str]:
    """A run folder locked by a live trainer (a process holding its lock), and a second trainer into it."""
    ck = base_run(d)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], cwd=d, stdout=subprocess.PIPE, text=True)
    HOLDERS.append(holder)
    holder.stdout.readline()
    return ["train", "--data-dir", "data", *T, "--epochs", "2", "--resume", ck, "--experiment", "base"]


MOUNTS: List[str] = []  # tmpfs mounts a case made (unmounted after it)


def _small_disk(d: str) -> str:
    """A copy of the base run on its own 64 MB tmpfs (needs root; ``mount``), returned as a relative path."""
    base_run(d)
    mnt = os.path.join(d, "disk")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", mnt], check=True)
    MOUNTS.append(mnt)
    shutil.copytree(os.path.join(d, "runs"), os.path.join(mnt, "runs"))
    return "disk"


def disk_full(d: str) -> List[str]:
    """Resume a run whose folder's disk is full (a filler file takes the rest of the tmpfs)."""
    mnt = _small_disk(d)
    with open(os.path.join(d, mnt, "filler"), "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return ["train", "--data-dir", "data", *T, "--epochs", "2", "--resume", f"{mnt}/runs/base/last.safetensors",
            "--output", f"{mnt}/runs", "--experiment", "base"]


def read_only(d: str) -> List[str]:
    """Resume a run whose folder's filesystem was remounted read-only."""
    mnt = _small_disk(d)
    subprocess.run(["mount", "-o", "remount,ro", os.path.join(d, mnt)], check=True)
    return ["train", "--data-dir", "data", *T, "--epochs", "2", "--resume", f"{mnt}/runs/base/last.safetensors",
            "--output", f"{mnt}/runs", "--experiment", "base"]


def fresh_into_finished(d: str) -> List[str]:
    base_run(d)
    return ["train", "--data-dir", "data", *T, "--experiment", "base"]


def old_run_intact(d: str, out: str, err: str) -> Optional[str]:
    return None if os.path.isdir(os.path.join(d, "runs", "base-1")) and "base-1" in err else \
        "no new folder for the second run, or not said"


FOREIGN_OPT = """
import copy, torch, timm, timm_split
from timm_split.checkpoint import save_checkpoint, load_checkpoint
a = timm_split.split(timm.create_model('test_resnet', num_classes=2), 2, img_size=32)
opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
a(torch.randn(2, 3, 32, 32)).sum().backward(); opt.step()
save_checkpoint(a, 'ck.safetensors', opt)
b = timm_split.split(timm.create_model('test_resnet', num_classes=2), 2, img_size=32, seed=5)
foreign = torch.optim.AdamW(list(b.parameters())[:3])
before = copy.deepcopy(b.state_dict())
try:
    load_checkpoint(b, 'ck.safetensors', foreign)
except ValueError as e:
    same = all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    print('OK' if same else 'CHANGED', str(e)[:200])
"""

SAVE_MISSING = """
import timm, timm_split
from timm_split.checkpoint import save_checkpoint
a = timm_split.split(timm.create_model('test_resnet', num_classes=2), 2, img_size=32)
save_checkpoint(a, 'nodir/sub/ck.safetensors')
"""

SPLIT_FACTOR_STR = "import timm, timm_split; timm.create_model('splitnet_test_resnet', split_factor='2')"
INFERENCE_MODE = """
import torch, timm, timm_split
with torch.inference_mode():
    e = timm_split.split(timm.create_model('test_resnet'), 2, img_size=32)
print('OK', type(e).__name__)
"""


def cases() -> List[Case]:
    c = Case
    wrong = "wrong images"
    damaged = "damaged or mixed-up runs"
    flags = "flags to refuse"
    tb = "tracebacks before"
    unclear = "unclear errors before"
    return [
        c(wrong, "no validation folder", train_cmd(splits={"train": ["a", "b"]}), pattern="validation"),
        c(wrong, "--val-split valdation", train_cmd("--val-split", "valdation"), pattern="valdation"),
        c(wrong, "validation classes {a, c}", train_cmd(splits={"train": ["a", "b"], "validation": ["a", "c"]}),
          pattern="class"),
        c(wrong, "validation classes {a, b, c}",
          train_cmd(splits={"train": ["a", "b"], "validation": ["a", "b", "c"]}), pattern="class"),
        c(wrong, "--class-map leaves out a class", class_map_case, pattern="leaves out|class"),
        c(wrong, "partial export", lambda d: (image_folder(os.path.join(d, "data"), AB), open(os.path.join(
            d, "data", ".timm_split_export.json"), "w").write('{"complete": false}'), [
            "train", "--data-dir", "data", *T])[2], pattern="export|incomplete|partial"),
        c(wrong, "validate on other class names", validate_cmd(splits={"validation": ["a", "c"]}), pattern="class"),
        c(damaged, "state edited (epoch 9)", resume_case(lambda p: edit_metadata(p, _state(
            lambda s: s.update(epoch=9))))),
        c(damaged, "one bit of the header flipped (epoch 1 -> 0)", resume_case(flip_state_byte)),
        c(damaged, "optimizer state edited (lr 123)", resume_case(lambda p: edit_metadata(p, _optim_lr))),
        c(damaged, "sha256 key deleted", resume_case(lambda p: edit_metadata(p, lambda m: m.pop("sha256")))),
        c(damaged, "fresh run into a finished run's folder", fresh_into_finished, expect="ok",
          check=old_run_intact, keep=("runs/base/last.safetensors", "runs/base/summary.csv")),
        c(damaged, "two trainers on one --experiment", second_trainer, pattern="pid|lock|running"),
        c(damaged, "disk full on resume (a real tmpfs)", disk_full, pattern="cannot write disk/.*No space left",
          keep=("disk/runs/base/last.safetensors", "disk/runs/base/summary.csv")),
        c(damaged, "read-only filesystem on resume", read_only, pattern="cannot write disk/.*Read-only",
          keep=("disk/runs/base/last.safetensors",)),
        c(damaged, "load_checkpoint with a foreign optimizer", py(FOREIGN_OPT), expect="ok",
          check=lambda d, out, err: None if out.startswith("OK") else f"got: {out[:200]}"),
        c(damaged, "stale temp files after a kill", stale_tmp, expect="ok", check=no_tmp_left),
        c(damaged, "truncated checkpoint", resume_case(lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2)),
          new=True),
        c(damaged, "--resume a folder (its last.safetensors, as --help says)", resume_folder, expect="ok",
          check=lambda d, out, err: None if "resumed runs/base/last.safetensors" in err else "not said", new=True),
        *[c(flags, " ".join(f), train_cmd(*f), pattern=FLAG_NAMES.get(f[-2], f[-2]), new=f[0] in NEW_FLAGS)
          for f in (("--img-size", "1"), ("--drop-path", "2"), ("--reprob", "2"), ("--hflip", "7"),
                    ("--train-subset", "-3"), ("--model-ema", "--model-ema-decay", "2"), ("-vb", "0"),
                    ("--in-chans", "0"), ("--crop-pct", "0"), ("--epochs", "0"), ("--mixup", "-1"),
                    ("--smoothing", "1.5"), ("--lr", "-1"), ("--split", "0"))],
        c(flags, "validate --img-size 1", validate_cmd("--img-size", "1"), pattern="img-size"),
        *[c(tb, " ".join(f), train_cmd(*f), pattern=p) for f, p in (
            (("--eval-metric", "top7"), "eval-metric"), (("--mean", "0.5", "0.5"), "mean"),
            (("--aa", "bogus-policy"), "aa"), (("--threads", "-1"), "threads"),
            (("--drop-path", "2", "--split", "1"), "drop-path"), (("--std", "0"), "std"),
            (("--opt", "adamw", "--opt-betas", "0.9"), "opt"), (("--model-kwargs", "drop_rate=abc"), "drop_rate"),
            (("--torchcompile", "nosuchbackend"), "torchcompile"), (("--class-map", "missing.txt"), "class-map"),
            (("--in-chans", "1"), "in-chans|channel"), (("--lr", "1e30", "--warmup-epochs", "0"), "lr"))],
        c(tb, "--model no_such_model", train_cmd("--model", "no_such_model"), pattern="model", new=True),
        c(tb, "a 196-Mpx PNG", bomb_png, pattern="big.png|MAX_IMAGE_PIXELS"),
        c(tb, "resume an SGD checkpoint with --opt adamw", resume_case(lambda p: None, "--opt", "adamw"),
          pattern="opt"),
        c(tb, "a corrupt PNG", lambda d: (image_folder(os.path.join(d, "data"), AB), open(os.path.join(
            d, "data", "train", "a", "0.png"), "wb").write(b"not a png"), ["train", "--data-dir", "data", *T])[2],
          expect="ok", check=lambda d, out, err: None if "0.png" in err else "the skipped file is not named",
          new=True),  # timm's ImageDataset skips an unreadable image with a warning naming it; kept as timm does
        c(unclear, "--train-subset 0", train_cmd("--train-subset", "0"), pattern="train-subset"),
        c(unclear, "--drop 1.5", train_cmd("--drop", "1.5"), pattern="--drop"),
        c(unclear, "--seed -1", train_cmd("--seed", "-1"), pattern=r"seed.*-1(?!\d)"),
        c(unclear, "--model-ema on resume of a non-EMA run", resume_case(lambda p: None, "--model-ema"),
          pattern="--model-ema|EMA"),
        c(unclear, "state metadata not JSON", resume_case(lambda p: edit_metadata(p, lambda m: m.update(
            state="{not json"))), pattern="last.safetensors"),
        c(unclear, "validate an empty folder", lambda d: (base_run(d), os.makedirs(os.path.join(d, "empty")), [
            "validate", "--checkpoint", "runs/base/last.safetensors", "--data-dir", "empty", "-j", "0",
            "--device", "cpu"])[2], pattern="validation|empty|no images"),
        c(unclear, "validate --results-file nodir/r.csv", validate_cmd("--results-file", "nodir/r.csv"),
          pattern="nodir"),
        c(unclear, "validate --num-classes 5", validate_cmd("--num-classes", "5"), pattern="2 classes|has 2"),
        c(unclear, "export --idx-dir /nonexistent", lambda d: ["export-fashion-mnist", "out", "--idx-dir",
                                                               "/nonexistent"], pattern="idx-dir"),
        c(unclear, "save_checkpoint into a missing folder", py(SAVE_MISSING), pattern="nodir"),
        c(unclear, "create_model(split_factor='2')", py(SPLIT_FACTOR_STR), pattern="split_factor"),
        c(unclear, "split() under inference_mode", py(INFERENCE_MODE), expect="ok",
          check=lambda d, out, err: None if out.startswith("OK") else f"got: {out[:200]}"),
    ]


def _digest(path: str) -> Optional[bytes]:
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).digest() if os.path.exists(path) else None


def classify(case: Case, rc: int, out: str, err: str, d: str, before: Dict[str, Optional[bytes]]) -> str:
    lost = [k for k, v in before.items() if _digest(os.path.join(d, k)) != v]
    if lost:
        return f"data-loss: {lost}"
    if "Traceback" in err:
        return "traceback: " + err.strip().splitlines()[-1][:160]
    if case.expect == "ok":
        if rc != 0:
            return f"unclear: exit {rc}: {err.strip()[-160:]}"
        problem = case.check(d, out.strip(), err) if case.check else None
        return f"silent: {problem}" if problem else "ok"
    if rc == 0:
        return "silent: exit 0"
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
    if len(lines) != 1:
        return f"unclear: {len(lines)} lines: {' | '.join(lines)[-160:]}"
    if case.pattern and not re.search(case.pattern, lines[0]):
        return f"unclear: {lines[0][:160]}"
    return "ok"


def run_case(case: Case, timeout: float) -> Dict[str, str]:
    d = tempfile.mkdtemp(prefix="hostile-")
    try:
        cmd = case.setup(d)
        before = {k: _digest(os.path.join(d, k)) for k in case.keep}
        argv = [sys.executable, "-c", cmd[1]] if cmd[0] == "python" else CLI + cmd
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = -1, "", "Traceback: timeout (hang?)"
        if cmd[0] == "python" and case.expect == "error" and rc != 0:  # a library error: its last line
            last = err.strip().splitlines()[-1] if err.strip() else ""
            if re.match(r"(\w+\.)*(ValueError|SplitError|FileNotFoundError|NotADirectoryError|PermissionError): ",
                        last):
                rc, err = 2, last  # the documented exceptions, one line; anything else stays a traceback
        outcome = classify(case, rc, out, err, d, before)
        return {"group": case.group, "case": case.name, "new": case.new, "outcome": outcome,
                "seconds": round(time.perf_counter() - t0, 1), "line": (err.strip().splitlines() or [""])[-1][:200]}
    finally:
        while HOLDERS:
            HOLDERS.pop().kill()
        while MOUNTS:
            subprocess.run(["umount", MOUNTS.pop()], check=False)
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    rows = []
    for case in cases():
        if args.k in case.name:
            rows.append(run_case(case, args.timeout))
            r = rows[-1]
            print(f"{r['outcome'].split(':')[0]:10s} {r['group'][:22]:22s} {r['case'][:48]:48s} {r['seconds']:5.1f}s"
                  f"  {r['outcome'] if r['outcome'] != 'ok' else r['line'][:90]}", flush=True)
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["outcome"].split(":")[0]] = counts.get(r["outcome"].split(":")[0], 0) + 1
    print(f"{len(rows)} cases ({sum(r['new'] for r in rows)} new):", counts)
    for d in BASE.values():
        shutil.rmtree(d, ignore_errors=True)
    if args.json:
        write_json(args.json, {"counts": counts, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
