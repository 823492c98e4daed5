"""Hostile-input campaign on the library API and on compare/sweep/validate (issue 36), by class, rerunnable.

    python benchmarks/hostile_api.py                          # every case; a line per case, counts per class
    python benchmarks/hostile_api.py -k scanner --json docs/hostile_api.json

The sibling of ``benchmarks/hostile_train.py`` (the trainer). Each case runs in a process of its own (forked from
this one, which has imported torch, timm and timm_split but computed nothing), in a fresh folder, with a timeout,
and is classified:

* ``ok``: what the case expects (a bad input: a ``ValueError``/``SplitError`` whose message names the cause, or for
  a command exit 2 (exit 1 where the case says so) with one line that names it; a good input: the right result);
* ``unclear``: the right kind of error, but the message does not name the cause (or more than one line);
* ``traceback``: another exception type (``RuntimeError``, ``KeyError``...) or a printed Python traceback;
* ``silent``: no error where the input is wrong, or a wrong result;
* ``hang``: over the case's timeout;
* ``data-loss``: a file or the state that a failed call must leave alone was changed.

The classes are the issue's: 1 loads, 2 output paths, 3 the CLI's errors, 4 caches and threads, 5 normalisation,
6 second-tier arguments, 7 silent no-ops, 8 the folder scanner and the views. Inputs are either listed (a case per
input) or generated: ``random.Random(seed)`` draws (marked ``generated`` in the JSON; ``--seed``, ``--draws``):
state dicts with one value corrupted at random, output paths drawn among a command's inputs, views of random
dtypes and shapes for every execution strategy, and values drawn for the second-tier options.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import timm  # noqa: F401 - imported once here; every case is a fork of this process
import torch

import timm_split  # noqa: F401 - registers splitnet_*
from common import image_folder, write_json

CLASSES = {1: "loads", 2: "output paths", 3: "CLI errors", 4: "caches and threads", 5: "normalisation",
           6: "second-tier arguments", 7: "silent no-ops", 8: "folder scanner and views"}
OUTCOMES = ("ok", "unclear", "traceback", "silent", "hang", "data-loss")
USER_ERRORS = ("ValueError", "SplitError")


class Case:
    """One hostile input. ``run(d)`` is called in a fresh folder ``d`` (in a forked process) and returns an
    outcome text (``'ok'`` or ``'<outcome>: <detail>'``)."""

    def __init__(self, cls: int, name: str, run: Callable[[str], str], generated: bool = False,
                 timeout: float = 120):
        self.cls, self.name, self.run, self.generated, self.timeout = cls, name, run, generated, timeout


# --------------------------------------------------------------------------------------------------------- helpers
def ens(S: int = 2, **kw: Any):
    return timm_split.split(timm.create_model("test_resnet", num_classes=kw.pop("num_classes", 4)), S, img_size=32,
                            **kw)


def registry(num_classes: int = 2):
    """The fixture checkpoint's model: ``splitnet_test_resnet``, S=2."""
    return timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=num_classes)


def snap(*modules) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def same(before: List[Dict[str, torch.Tensor]], *modules) -> bool:
    return all(set(b) == set(m.state_dict()) and all(torch.equal(b[k], v) for k, v in m.state_dict().items())
               for b, m in zip(before, modules))


def digest(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def error(call: Callable[[], Any], pattern: str, unchanged: Callable[[], bool] = lambda: True) -> str:
    """A bad input: a ValueError/SplitError naming ``pattern``; ``unchanged()`` must hold after it."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - classified
        kind = type(e).__name__
        if not unchanged():
            return f"data-loss: state changed by a failed call ({kind}: {str(e)[:100]})"
        if kind not in USER_ERRORS:
            return f"traceback: {kind}: {' '.join(str(e).split())[:160]}"
        if pattern and not re.search(pattern, str(e), re.I):
            return f"unclear: {' '.join(str(e).split())[:160]}"
        return "ok"
    if not unchanged():
        return "silent: accepted, and the state changed"
    return "silent: accepted"


def fine(call: Callable[[], Any], check: Callable[[Any], Optional[str]] = lambda r: None) -> str:
    """A good input: no error, and ``check(result)`` is None."""
    try:
        r = call()
    except Exception as e:  # noqa: BLE001
        return f"traceback: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    problem = check(r)
    return f"silent: {problem}" if problem else "ok"


def cli(argv: List[str], pattern: str = "", code: int = 2, keep: tuple = (), ok: bool = False,
        warn: str = "") -> str:
    """A command run in this process (``main(argv)``) with stdout/stderr captured at the file descriptors."""
    from timm_split.commands.main import main

    before = {k: digest(k) for k in keep}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - an uncaught exception is a traceback
            traceback.print_exc()
            rc = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    err.seek(0)
    text = err.read()
    lost = [k for k, v in before.items() if digest(k) != v]
    if lost:
        return f"data-loss: {lost}"
    if "Traceback" in text:
        return "traceback: " + text.strip().splitlines()[-1][:160]
    lines = [x for x in text.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
    if ok:
        if rc != 0:
            return f"unclear: exit {rc}: {' | '.join(lines)[-160:]}"
        if warn and not re.search(warn, text):
            return f"silent: no warning matching {warn!r}"
        return "ok"
    if rc == 0:
        return "silent: exit 0"
    if rc != code or len(lines) != 1:
        return f"unclear: exit {rc}, {len(lines)} lines: {' | '.join(lines)[-160:]}"
    if pattern and not re.search(pattern, lines[0]):
        return f"unclear: {lines[0][:160]}"
    return "ok"


def shell(cmd: str, pattern: str, code: Any, timeout: float = 300, sigint_after: float = 0.0) -> str:
    """A command in a real shell (pipes, signals)."""
    import signal

    def default_sigint() -> None:  # a background shell's children inherit an ignored SIGINT; a user's do not
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=default_sigint)
    if sigint_after:
        time.sleep(sigint_after)
        os.killpg(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return f"hang: over {timeout:.0f}s"
    if "Traceback" in err or "Exception ignored" in err:
        return "traceback: " + err.strip().splitlines()[-1][:160]
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
    codes = code if isinstance(code, tuple) else (code,)
    if p.returncode not in codes or not re.search(pattern, " ".join(lines) or "<nothing>"):
        return f"unclear: exit {p.returncode}: {' | '.join(lines)[-160:]}"
    return "ok"


FIX = "fixtures"  # made once, in a subprocess, before any case (this process computes nothing)
MAKE_FIXTURES = """
import copy, os, timm, torch, timm_split
from timm_split.checkpoint import save_checkpoint
from common import image_folder
d = {d!r}
m = timm.create_model('splitnet_test_resnet', split_factor=2, num_classes=2)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
m(torch.randn(2, 3, 32, 32)).sum().backward(); opt.step()
save_checkpoint(m, os.path.join(d, 'ck.safetensors'), opt, model_ema=copy.deepcopy(m))
image_folder(os.path.join(d, 'data'), {{'validation': ['a', 'b']}}, per_class=2, size=16)
"""


def fixture(d: str) -> Dict[str, str]:
    """Copy the fixtures into the case's folder: ``ck.safetensors`` (S=2, 2 classes, with optimizer and EMA state)
    and ``data/validation/{a,b}``."""
    shutil.copytree(FIXTURES, d, dirs_exist_ok=True)
    return {"ck": "ck.safetensors", "data": "data"}


def validate_argv(*extra: str) -> List[str]:
    return ["validate", "--checkpoint", "ck.safetensors", "--model", "splitnet_test_resnet", "--split", "2",
            "--num-classes", "2", "--data-dir", "data", "-j", "0", "--device", "cpu", "--img-size", "32", *extra]


def sweep_csv(path: str) -> None:
    import csv

    from timm_split.commands.sweep import FIELDS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        w.writeheader()
        w.writerow(dict(arch="resnet18", module="resnet", split=2, status="ok", reason="", seconds=0.1))


# --------------------------------------------------------------------------------------------------------- cases
CORRUPT = {
    "a numpy array": lambda v: v.numpy(),
    "a Python list": lambda v: v.tolist(),
    "an int": lambda v: 3,
    "None": lambda v: None,
    "a string": lambda v: "weights",
    "a tensor of another dtype kind": lambda v: v.long() if v.is_floating_point() else v.float(),
    "a bool tensor (a float one where the value is an integer)": lambda v: v.bool() if v.is_floating_point()
    else v.float(),
    "a complex tensor": lambda v: v.to(torch.complex64),
    "one element fewer": lambda v: v.flatten()[1:] if v.numel() > 1 else v.reshape(1, 1),
    "a meta tensor": lambda v: v.to("meta"),
    "a NaN-filled tensor of the right shape": lambda v: torch.full_like(v, float("nan")) if v.is_floating_point()
    else v,
}


def corrupt_state_dict(rng: random.Random) -> Case:
    how = rng.choice(sorted(CORRUPT))
    index = rng.randrange(10_000)

    def run(d: str) -> str:
        e = ens()
        sd = {k: v.clone() for k, v in e.state_dict().items()}
        key = sorted(sd)[index % len(sd)]
        sd[key] = CORRUPT[how](sd[key])
        if how.startswith("a NaN"):  # loading NaNs is the user's right: it must load exactly that
            return fine(lambda: e.load_state_dict(sd), lambda r: None if all(
                torch.equal(e.state_dict()[k], v) if not v.is_floating_point() else
                bool(torch.isnan(e.state_dict()[k]).all() == torch.isnan(v).all()) for k, v in sd.items())
                else "not loaded as given")
        before = snap(e)
        return error(lambda: e.load_state_dict(sd), re.escape(key.split(".")[-1]), lambda: same(before, e))
    return Case(1, f"load_state_dict with {how} at key #{index}", run, generated=True)


def _load_listed() -> List[Case]:
    def opt_foreign(d):
        from timm_split.checkpoint import load_checkpoint
        fixture(d)
        e = registry()
        opt = torch.optim.AdamW(list(e.parameters())[:3])
        before = snap(e)
        return error(lambda: load_checkpoint(e, "ck.safetensors", opt), "optim|SGD|AdamW", lambda: same(before, e))

    def ema_wrong_classes(d):
        from timm_split.checkpoint import load_checkpoint
        fixture(d)
        e, ema = registry(), registry(num_classes=5)
        before = snap(e, ema)
        return error(lambda: load_checkpoint(e, "ck.safetensors", model_ema=ema), "class|ema|shape",
                     lambda: same(before, e, ema))

    def truncated(d):
        from timm_split.checkpoint import load_checkpoint
        fixture(d)
        with open("ck.safetensors", "r+b") as f:
            f.truncate(os.path.getsize("ck.safetensors") // 2)
        e = registry()
        before = snap(e)
        return error(lambda: load_checkpoint(e, "ck.safetensors"), "ck.safetensors", lambda: same(before, e))

    def ema_is_model(d):
        from timm_split.checkpoint import save_checkpoint
        e = ens()
        return _ok_or_named(lambda: save_checkpoint(e, "x.safetensors", model_ema=e), "model_ema|same")

    return [Case(1, "load_checkpoint with a foreign optimizer", opt_foreign),
            Case(6, "save_checkpoint(model, path, model_ema=model) (the same module)", ema_is_model),
            Case(1, "load_checkpoint with an EMA of other classes", ema_wrong_classes),
            Case(1, "load_checkpoint of a truncated file", truncated)]


def output_is_input(rng: random.Random) -> Case:
    """validate's --results-file drawn among its inputs, through an alias."""
    target = rng.choice(["ck.safetensors", "data/validation/a/0.png", "data/validation/b/1.png"])
    alias = rng.choice(["same", "dotdot", "symlink", "hardlink", "absolute"])

    def run(d: str) -> str:
        fixture(d)
        path = {"same": target, "dotdot": os.path.join("data", "..", target), "absolute": os.path.abspath(target),
                "symlink": "link.json", "hardlink": "hard.json"}[alias]
        if alias == "symlink":
            os.symlink(os.path.abspath(target), path)
        if alias == "hardlink":
            os.link(target, path)
        return cli(validate_argv("--results-file", path), "--results-file", keep=(target,))
    return Case(2, f"validate --results-file = {target} ({alias})", run, generated=True)


def _outputs_listed() -> List[Case]:
    def sweep_md_is(which):
        def run(d):
            sweep_csv("zoo.csv")
            argv = ["sweep", "--report", "zoo.csv", "--markdown", "zoo.csv"] if which == "report" else \
                ["sweep", "--filter", "resnet18", "--out", "zoo.csv", "--markdown", "./zoo.csv"]
            if which == "out":
                from timm_split.commands import sweep
                sweep.run_sweep = lambda *a, **k: sweep._read("zoo.csv")  # the sweep itself is not the case
            return cli(argv, "--markdown", keep=("zoo.csv",))
        return run

    def train_class_map_in_run(d):
        fixture(d)
        os.makedirs("runs/x")
        shutil.copy("ck.safetensors", "runs/x/last.safetensors")
        with open("runs/x/summary.csv", "w") as f:
            f.write("a\nb\n")
        image_folder("tr", {"train": ["a", "b"], "validation": ["a", "b"]}, per_class=4, size=16)
        return cli(["train", "--data-dir", "tr", "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b",
                    "4", "-j", "0", "--device", "cpu", "--output", "runs", "--experiment", "x", "--resume",
                    "runs/x/last.safetensors", "--class-map", "runs/x/summary.csv", "--no-progress"],
                   "class-map|class map", keep=("runs/x/summary.csv",))

    return [Case(2, "sweep --markdown = --report", sweep_md_is("report")),
            Case(2, "sweep --markdown = --out (./)", sweep_md_is("out")),
            Case(2, "train --class-map is the run's summary.csv", train_class_map_in_run, timeout=300)]


def _cli_errors() -> List[Case]:
    def compare_unsplittable(d):
        return cli(["compare", "lambda_resnet26rpt_256", "--split", "2", "--no-check"], "SplitError", code=1)

    def compare_glob(d):
        out = cli(["compare", "lambda_resnet26*", "--split", "2", "--no-check", "--format", "json"],
                  "lambda_resnet26rpt_256 S=2", code=1)
        return out

    def validate_other_model(d):
        fixture(d)
        return cli(["validate", "--checkpoint", "ck.safetensors", "--model", "splitnet_resnet18", "--split", "2",
                    "--num-classes", "2", "--data-dir", "data", "-j", "0", "--device", "cpu"],
                   "ck.safetensors|shape|resnet18|missing")

    def validate_garbage(d):
        fixture(d)
        with open("junk.pth", "wb") as f:
            f.write(b"\x80\x04not a pickle at all")
        return cli(["validate", "--checkpoint", "junk.pth", "--model", "splitnet_test_resnet", "--split", "2",
                    "--num-classes", "2", "--data-dir", "data", "-j", "0", "--device", "cpu"], "junk.pth")

    def validate_in_chans(d):
        fixture(d)
        return cli(validate_argv("--img-size", "8", "--crop-pct", "1e-9"), "crop|size|img")

    py = f"{sys.executable} -m timm_split.commands.main"
    return [
        Case(3, "compare lambda_resnet26rpt_256 --split 2 (unsplittable)", compare_unsplittable, timeout=300),
        Case(3, "compare 'lambda_resnet26*' --split 2 (one row fails, the rest kept)", compare_glob, timeout=400),
        Case(3, "validate a test_resnet checkpoint as --model splitnet_resnet18", validate_other_model),
        Case(3, "validate --checkpoint junk.pth (not a pickle)", validate_garbage),
        Case(3, "validate --crop-pct 1e-9", validate_in_chans),
        Case(3, "compare ... --format csv | head -1 (broken pipe)",
             lambda d: shell(f"{py} compare resnet18 test_resnet --split 2 4 --no-check --format csv | head -c 10 "
                             "> /dev/null; exit ${PIPESTATUS[0]}", "<nothing>", (0, 141)), timeout=300),
        Case(3, "Ctrl-C during compare",
             lambda d: shell(f"{py} compare 'convnext_*' 'vit_*' --split 2 4 8", "interrupted", 130,
                             sigint_after=15, timeout=240), timeout=300),
        Case(3, "train --opt-kwargs x (a pair without '=')",
             lambda d: cli(["train", "--model", "test_resnet", "--opt-kwargs", "x"], "opt-kwargs")),
        Case(3, "unknown command", lambda d: cli(["comapre", "resnet18"], "invalid choice")),
    ]


def _caches_threads() -> List[Case]:
    def data_edit(strategy):
        def run(d):
            e = ens().eval().set_execution(strategy)
            x = torch.randn(2, 3, 32, 32)
            with torch.no_grad():
                e(x)
                for p in e.parameters():
                    p.data.mul_(0.5)
                got = e(x)
                want = e.set_execution("loop")(x)
            return "ok" if torch.allclose(got, want, atol=1e-5) else \
                f"silent: {strategy} after .data edits differs from the loop by {(got - want).abs().max():.3g}"
        return run

    def two_threads(strategy):
        def run(d):
            import threading
            e = ens(4).eval().set_execution(strategy)
            x = torch.randn(2, 3, 32, 32)
            with torch.no_grad():
                want = e.set_execution("loop")(x)
            e.set_execution(strategy)
            errors: List[str] = []

            def go():
                try:
                    with torch.no_grad():
                        for _ in range(20):
                            if not torch.allclose(e(x), want, atol=1e-5):
                                errors.append("silent: a wrong output")
                except Exception as ex:  # noqa: BLE001
                    errors.append(f"traceback: {type(ex).__name__}: {str(ex)[:120]}")
            ts = [threading.Thread(target=go) for _ in range(2)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            return errors[0] if errors else "ok"
        return run

    return [Case(4, f"{s}: forward after p.data.mul_(.5)", data_edit(s)) for s in ("packed", "threads+packed")] + \
        [Case(4, f"{s}: one ensemble called from two Python threads", two_threads(s), timeout=200)
         for s in ("threads", "threads+packed", "packed")]


def _normalisation() -> List[Case]:
    def no_head(d):
        m = timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=-1)
        out = m(torch.randn(2, 3, 32, 32))
        return "ok" if out.shape[-1] == m.num_features else \
            f"silent: output {tuple(out.shape)} but num_features {m.num_features}"

    def wrapped(kind):
        def run(d):
            base = timm.create_model("test_resnet", num_classes=4)
            model = {"DataParallel": lambda: torch.nn.DataParallel(base),
                     "compiled": lambda: torch.compile(base)}[kind]()
            return fine(lambda: timm_split.split(model, 2, img_size=32), lambda e: None if isinstance(
                e, timm_split.SplitEnsemble) else "not an ensemble") if kind == "DataParallel" else \
                _ok_or_named(lambda: timm_split.split(model, 2, img_size=32), "compile|OptimizedModule|_orig_mod")
        return run

    def returns(kind):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 16, 3)
                self.fc = torch.nn.Linear(16, 4)

            def forward(self, x):
                y = self.fc(self.conv(x).mean((2, 3)))
                return (y, y) if kind == "tuple" else {"logits": y}
        return lambda d: _ok_or_named(lambda: timm_split.split(Net(), 2, img_size=16)(torch.randn(2, 3, 16, 16)),
                                      "tuple|dict|output")

    return [Case(5, "create_model(splitnet_test_resnet, num_classes=-1)", no_head),
            Case(5, "split(DataParallel(model))", wrapped("DataParallel")),
            Case(5, "split(torch.compile(model))", wrapped("compiled"), timeout=300),
            Case(5, "split of a model returning a tuple", returns("tuple")),
            Case(5, "split of a model returning a dict", returns("dict"))]


def _ok_or_named(call: Callable[[], Any], pattern: str) -> str:
    """Either it works, or it is refused naming ``pattern`` (both are right; a raw error is not)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ not in USER_ERRORS:
            return f"traceback: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
        return "ok" if re.search(pattern, str(e), re.I) else f"unclear: {' '.join(str(e).split())[:160]}"
    return "ok"


SECOND_TIER = {  # option -> (call(value), pattern the error must name), values drawn from POOL
    "set_execution(strategy)": (lambda v: ens().set_execution(v), "strategy|execution"),
    "set_execution('threads', workers=)": (lambda v: ens().set_execution("threads", workers=v), "workers"),
    "set_execution('loop', <unknown option>=)": (lambda v: ens().set_execution("loop", bogus=v), "bogus"),
    "param_groups(weight_decay=)": (lambda v: __import__("timm_split.training.optim", fromlist=["x"]).param_groups(
        ens(), v), "weight_decay"),
    "to_devices(devices)": (lambda v: ens().to_devices(v), "device"),
    "save_checkpoint(state=)": (lambda v: __import__("timm_split.checkpoint", fromlist=["x"]).save_checkpoint(
        ens(), "x.safetensors", state=v), "state"),
    "split(drop_scale=)": (lambda v: ens(drop_scale=v), "drop_scale"),
    "split(averaging=)": (lambda v: ens(averaging=v), "averaging"),
    "split(plan_at=)": (lambda v: ens(plan_at=v), "plan_at"),
    "split(scale_regularization=)": (lambda v: ens(scale_regularization=v), "scale_regularization"),
}
POOL = [-1, 0, float("nan"), float("inf"), "bogus", None, [], [object()], {"a": object()}, 1.5, "", b"x",
        torch.tensor(1.0), ["cuda:9", "cpu"], object(), True, 2, "sqrt", "probs", "model", "threads", ["cpu", "cpu"],
        {"epoch": (1, 2)}, {"epoch": 1}]
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _jsonable(v: Any) -> bool:
    try:
        return json.loads(json.dumps(v)) == v
    except (TypeError, ValueError):
        return False


VALID = {  # option -> whether a value is in its declared domain (then it must be accepted)
    "set_execution(strategy)": lambda v: isinstance(v, str) and v in ("auto", "loop", "threads", "threads+packed",
                                                                      "compile", "packed"),
    "set_execution('threads', workers=)": lambda v: _number(v) and isinstance(v, int) and v >= 1,
    "set_execution('loop', <unknown option>=)": lambda v: False,
    "param_groups(weight_decay=)": lambda v: _number(v) and v >= 0,
    "to_devices(devices)": lambda v: isinstance(v, list) and v == ["cpu", "cpu"],
    "save_checkpoint(state=)": lambda v: v is None or (isinstance(v, dict) and _jsonable(v)),
    "split(drop_scale=)": lambda v: isinstance(v, str) and v in ("S", "sqrt"),
    "split(averaging=)": lambda v: isinstance(v, str) and v in ("logits", "probs"),
    "split(plan_at=)": lambda v: isinstance(v, str) and v in ("cfg", "model"),
    "split(scale_regularization=)": lambda v: isinstance(v, bool),
}


def second_tier(rng: random.Random) -> Case:
    option = rng.choice(sorted(SECOND_TIER))
    value = rng.choice(POOL)
    call, pattern = SECOND_TIER[option]
    good = VALID[option](value)
    return Case(6, f"{option} = {value!r}"[:90],
                lambda d: fine(lambda: call(value)) if good else error(lambda: call(value), pattern), generated=True)


def _no_ops() -> List[Case]:
    def in_tmp_report(argv, pattern):
        def run(d):
            sweep_csv("zoo.csv")
            return cli([a.replace("REPORT", "zoo.csv") for a in argv], pattern)
        return run

    return [
        Case(7, "sweep --filter 'nomatch*'", lambda d: cli(["sweep", "--filter", "nomatch*"], "nomatch")),
        Case(7, "sweep --filter resnet18 --exclude 'nomatch*'",
             lambda d: cli(["sweep", "--filter", "resnet18", "--exclude", "nomatch*"], "nomatch")),
        Case(7, "sweep --tier default --filter 'vit_huge*'",
             lambda d: cli(["sweep", "--tier", "default", "--filter", "vit_huge*"], "vit_huge")),
        Case(7, "sweep --report CSV (no --markdown: nothing to do)", in_tmp_report(["sweep", "--report", "REPORT"],
                                                                                "markdown")),
        Case(7, "compare 'nomatch*'", lambda d: cli(["compare", "nomatch*"], "nomatch")),
        Case(7, "compare --split 1 --by-module 2 (warns)",
             lambda d: cli(["compare", "test_resnet", "--split", "1", "--by-module", "2", "--no-check"], ok=True,
                           warn="--by-module does nothing")),
        Case(7, "compare --per-member --format json (warns)",
             lambda d: cli(["compare", "test_resnet", "--split", "2", "--per-member", "--format", "json",
                            "--no-check"], ok=True, warn="--per-member does nothing"), timeout=200),
        Case(7, "validate --amp-dtype float16 without --amp (warns)",
             lambda d: (fixture(d), cli(validate_argv("--amp-dtype", "float16"), ok=True,
                                        warn="--amp-dtype does nothing"))[1]),
        Case(7, "train --model-ema-decay 0.9 without --model-ema (warns)",
             lambda d: (image_folder("tr", {"train": ["a", "b"], "validation": ["a", "b"]}, per_class=4, size=16),
                        cli(["train", "--data-dir", "tr", "--model", "test_resnet", "--img-size", "32", "--epochs",
                             "1", "-b", "4", "-j", "0", "--device", "cpu", "--output", "runs", "--no-progress",
                             "--model-ema-decay", "0.9", "--warmup-epochs", "0"], ok=True,
                            warn="--model-ema-decay does nothing"))[1], timeout=300),
    ]


def _folder_case(name: str, make: Callable[[str], None], pattern: str = "", classes: Optional[List[str]] = None,
                 images: Optional[int] = None) -> Case:
    def run(d):
        image_folder("data", {"validation": ["a", "b"]}, per_class=2, size=16)
        make(os.path.join(d, "data", "validation"))
        from timm_split.training.data import create_eval_dataset
        if classes is None:
            return error(lambda: create_eval_dataset("", "data", "validation"), pattern)

        def check(r):
            ds, names, _ = r
            if names != classes or len(ds) != images:
                return f"classes {names}, {len(ds)} images; expected {classes}, {images}"
            return None
        return fine(lambda: create_eval_dataset("", "data", "validation"), check)
    return Case(8, name, run, timeout=60)


def _png(path: str) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 16)).save(path)


def _scanner() -> List[Case]:
    j = os.path.join
    return [
        _folder_case("a hidden .ipynb_checkpoints folder in a class", lambda v: _png(j(v, "a", ".ipynb_checkpoints",
                                                                                          "0.png")), classes=["a", "b"],
                     images=4),
        _folder_case("a hidden class folder", lambda v: _png(j(v, ".cache", "0.png")), classes=["a", "b"], images=4),
        _folder_case("macOS ._ files", lambda v: _png(j(v, "a", "._0.png")), classes=["a", "b"], images=4),
        _folder_case("an upper-case .PNG", lambda v: _png(j(v, "a", "X.PNG")), classes=["a", "b"], images=5),
        _folder_case("nested folders with one name in two classes",
                     lambda v: (_png(j(v, "a", "x", "0.png")), _png(j(v, "b", "x", "0.png"))), classes=["a", "b"],
                     images=6),
        _folder_case("a text file in a class", lambda v: open(j(v, "a", "notes.txt"), "w").write("x"),
                     classes=["a", "b"], images=4),
        _folder_case("an image directly in the split folder", lambda v: _png(j(v, "stray.png")), "stray.png"),
        _folder_case("an empty class folder", lambda v: os.makedirs(j(v, "c")), "c'|\\bc\\b"),
        _folder_case("a symlink loop", lambda v: os.symlink(v, j(v, "a", "loop")), "loop"),
        _folder_case("a broken symlink image", lambda v: os.symlink(j(v, "gone.png"), j(v, "a", "dead.png")),
                     "dead.png"),
    ]


VIEW_DTYPES = [torch.uint8, torch.int64, torch.bool, torch.float16, torch.float64, torch.complex64]


def views_case(rng: random.Random) -> Case:
    strategy = rng.choice(["loop", "threads", "packed", "threads+packed"])
    kind = rng.choice(["dtype", "members", "batch", "list", "rank"])
    dtype = rng.choice(VIEW_DTYPES)
    extra = rng.choice([-1, 1])

    def run(d):
        e = ens().eval().set_execution(strategy)
        S, B = 2, 2
        if kind == "dtype":
            views = torch.zeros(S, B, 3, 32, 32, dtype=dtype)
            pattern = "dtype|float|" + str(dtype).split(".")[-1]
        elif kind == "members":
            views = torch.zeros(S + extra, B, 3, 32, 32)
            pattern = "member|views|S"
        elif kind == "batch":
            views = [torch.zeros(B, 3, 32, 32), torch.zeros(B + 1, 3, 32, 32)]
            pattern = "batch"
        elif kind == "list":
            views = [torch.zeros(B, 3, 32, 32)] * (S + extra)
            pattern = "member|views"
        else:  # one image without a batch dim ([B, C, H, W] alone is a batch every member takes)
            views = torch.zeros(3, 32, 32)
            pattern = "views|dim|shape|batch"
        with torch.no_grad():
            return error(lambda: e.forward_members(views), pattern)
    label = {"dtype": f"{dtype}", "members": f"S{extra:+d} views", "batch": "unequal batches",
             "list": f"a list of S{extra:+d}", "rank": "3-d views (no batch)"}[kind]
    return Case(8, f"forward_members({label}) under {strategy}", run, generated=True)


def cases(seed: int, draws: int) -> List[Case]:
    rng = random.Random(seed)
    return ([corrupt_state_dict(rng) for _ in range(draws)] + _load_listed()
            + [output_is_input(rng) for _ in range(max(4, draws // 2))] + _outputs_listed()
            + _cli_errors() + _caches_threads() + _normalisation()
            + [second_tier(rng) for _ in range(draws)] + _no_ops() + _scanner()
            + [views_case(rng) for _ in range(draws)])


# --------------------------------------------------------------------------------------------------------- runner
def _child(case: Case, d: str, conn) -> None:
    torch.set_num_threads(1)
    os.chdir(d)
    import logging
    logging.getLogger("timm_split").setLevel(logging.WARNING)
    try:
        outcome = case.run(d)
    except BaseException as e:  # noqa: BLE001 - the case's own setup failed
        outcome = f"traceback: case setup: {type(e).__name__}: {str(e)[:160]}"
    conn.send(outcome)


def run_case(case: Case) -> Dict[str, Any]:
    d = tempfile.mkdtemp(prefix="hostile-api-")
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(case, d, child))
    p.start()
    if parent.poll(case.timeout):
        outcome = parent.recv()
    else:
        outcome = f"hang: over {case.timeout:.0f}s"
    p.kill()
    p.join()
    shutil.rmtree(d, ignore_errors=True)
    return {"class": case.cls, "class_name": CLASSES[case.cls], "case": case.name, "generated": case.generated,
            "outcome": outcome, "seconds": round(time.perf_counter() - t0, 1)}


FIXTURES = ""


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    global FIXTURES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    ap.add_argument("--draws", type=int, default=12, help="generated inputs per generated group")
    ap.add_argument("--json", help="write the records and counts here (atomically)")
    args = ap.parse_args(argv)
    FIXTURES = tempfile.mkdtemp(prefix="hostile-api-fixtures-")
    bench = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", MAKE_FIXTURES.format(d=FIXTURES)], check=True,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join([bench, os.environ.get("PYTHONPATH", "")])))
    rows = []
    try:
        for case in cases(args.seed, args.draws):
            if args.k in case.name:
                r = run_case(case)
                rows.append(r)
                print(f"{r['outcome'].split(':')[0]:10s} {r['class']} {r['case'][:70]:70s} {r['seconds']:6.1f}s  "
                      f"{'' if r['outcome'] == 'ok' else r['outcome'][:150]}", flush=True)
    finally:
        shutil.rmtree(FIXTURES, ignore_errors=True)
    by_class = {f"{c} {name}": {o: 0 for o in OUTCOMES} for c, name in CLASSES.items()}
    for r in rows:
        by_class[f"{r['class']} {r['class_name']}"][r["outcome"].split(":")[0]] += 1
    totals = {o: sum(v[o] for v in by_class.values()) for o in OUTCOMES}
    print(f"{len(rows)} cases ({sum(r['generated'] for r in rows)} generated, seed {args.seed}): {totals}")
    for k, v in by_class.items():
        print(f"  {k:32s} " + "  ".join(f"{o} {n}" for o, n in v.items() if n))
    if args.json:
        write_json(args.json, {"command": "python benchmarks/hostile_api.py " + " ".join(argv or sys.argv[1:]),
                               "seed": args.seed, "draws": args.draws, "totals": totals, "by_class": by_class,
                               "rows": rows})
    return rows


if __name__ == "__main__":
    main()
