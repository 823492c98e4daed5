"""Issue 36, the commands' classes: the output-path guard (2), the CLI's error funnel (3), silent no-ops (7), the
folder scanner and the member views' contract (8), and the flag table (every flag of every command, values drawn
from and around its domain). In-process (``main([...])`` with capsys), tiny models and data."""
import argparse
import errno
import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from timm_split.commands.main import build_parser, main
from timm_split.errors import SplitError


def _png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _folder(root, classes=("a", "b"), per_class=2, split="validation"):
    for c in classes:
        for i in range(per_class):
            _png(os.path.join(root, split, c, f"{i}.png"), 40 * i)
    return str(root)


def _exit(capsys, argv):
    """``main(argv)``'s exit status (returned or raised) and the lines it wrote to stderr, logs aside."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    return rc, [x for x in err.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]


def _one_line(capsys, argv, *needles, code=2):
    rc, lines = _exit(capsys, argv)
    assert rc == code and len(lines) == 1, (rc, lines)
    assert "Traceback" not in lines[0] and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _digest(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm
    import timm_split  # noqa: F401 - registers splitnet_*
    from timm_split.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ck")
    path = str(d / "ck.safetensors")
    save_checkpoint(timm.create_model("splitnet_test_resnet", split_factor=2, num_classes=2), path)
    return path, _folder(d / "data")


def _validate(checkpoint, *extra):
    path, data = checkpoint
    return ["validate", "--checkpoint", path, "--model", "splitnet_test_resnet", "--split", "2", "--num-classes", "2",
            "--data-dir", data, "-j", "0", "--device", "cpu", "--img-size", "32", *extra]


# ---------------------------------------------------------------------------------------------------------------
# class 2: no output may be an input or another output

def _aliases(path, tmp):
    """Paths that are ``path``: itself, via '..', a symlink and a hard link."""
    d = os.path.dirname(path)
    sym, hard = os.path.join(tmp, "sym.out"), os.path.join(tmp, "hard.out")
    if not os.path.lexists(sym):
        os.symlink(path, sym)
    if not os.path.exists(hard):
        os.link(path, hard)
    return {"same": path, "dotdot": os.path.join(d, "..", os.path.basename(d), os.path.basename(path)),
            "symlink": sym, "hardlink": hard}


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "hardlink"])
def test_validate_results_file_may_not_be_the_checkpoint(checkpoint, tmp_path, capsys, how):
    path, _ = checkpoint
    before = _digest(path)
    out = _aliases(path, str(tmp_path))[how]
    _one_line(capsys, _validate(checkpoint, "--results-file", out), "--results-file", "--checkpoint")
    assert _digest(path) == before


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(pick=st.sampled_from(["image", "class folder", "split folder"]))
def test_validate_results_file_may_not_be_a_data_file(checkpoint, capsys, pick):
    """Output paths drawn among the data's files and folders: refused, and every file intact."""
    path, data = checkpoint
    image = os.path.join(data, "validation", "a", "0.png")
    out = {"image": image, "class folder": os.path.dirname(image),
           "split folder": os.path.join(data, "validation")}[pick]
    before = _digest(image)
    _one_line(capsys, _validate(checkpoint, "--results-file", out), "--results-file")
    assert _digest(image) == before


def _sweep_csv(path):
    import csv

    from timm_split.commands.sweep import FIELDS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        w.writeheader()
        w.writerow(dict(arch="a", module="m", split=2, status="ok", reason="", seconds=0.1))


def test_sweep_markdown_may_not_be_the_csv_it_reads(tmp_path, capsys, monkeypatch):
    from timm_split.commands import sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: [])
    csv_path = tmp_path / "zoo.csv"
    _sweep_csv(csv_path)
    before = _digest(csv_path)
    _one_line(capsys, ["sweep", "--report", str(csv_path), "--markdown", str(csv_path)], "--markdown", "--report")
    _one_line(capsys, ["sweep", "--filter", "resnet18", "--out", str(csv_path), "--markdown",
                       str(tmp_path / "." / "zoo.csv")], "--markdown", "--out")
    assert _digest(csv_path) == before


def test_guard_compares_every_output_with_every_other(tmp_path):
    from timm_split.commands.common import check_output_paths

    a = tmp_path / "a.json"
    with pytest.raises(ValueError, match="--y .* and --x .* are the same file"):
        check_output_paths({"--x": str(a), "--y": str(tmp_path / "sub" / ".." / "a.json")}, {})
    check_output_paths({"--x": str(a), "--y": str(tmp_path / "b.json")}, {"--in": str(tmp_path / "c")})


def test_train_run_folder_may_not_hold_an_input(tmp_path):
    from timm_split.commands.run_folder import check_run_outputs

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.csv").write_text("x")
    with pytest.raises(ValueError, match="--class-map"):
        check_run_outputs(str(run), {"--class-map": str(run / "summary.csv")})
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    with pytest.raises(ValueError, match="inside --data-dir"):
        check_run_outputs(str(data / "myrun"), {"--data-dir": [str(data)]})
    (run / "last.safetensors").write_text("x")  # a resume in place replaces its own checkpoint: allowed
    os.link(run / "last.safetensors", run / "model_best.safetensors")  # the saver's hard links among run files
    check_run_outputs(str(run), {}, resume=str(run / "last.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# class 3: one funnel for every error a command can meet

def _raise(exc):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc, code, needle", [
    (SplitError("cannot split this"), 2, "cannot split this"),
    (FileNotFoundError(2, "No such file or directory", "x.bin"), 2, "x.bin"),
    (PermissionError(13, "Permission denied", "ro.csv"), 2, "ro.csv"),
    (OSError(errno.ENOSPC, "No space left on device", "full.csv"), 1, "full.csv"),
    (RuntimeError("Given groups=1, weight of size [8, 3, 3, 3]"), 1, "RuntimeError: Given groups=1"),
    (KeyError("boom"), 1, "KeyError"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_every_error_is_one_line_with_its_exit_status(monkeypatch, capsys, exc, code, needle):
    import timm_split.commands.main as m

    monkeypatch.setattr(m, "_cmd_demo", _raise(exc))
    _one_line(capsys, ["demo"], "timm-split demo: error:", needle, code=code)


def test_broken_pipe_is_quiet_and_debug_shows_the_traceback(monkeypatch, capsys):
    import timm_split.commands.main as m

    monkeypatch.setattr(m, "_cmd_demo", _raise(BrokenPipeError(32, "Broken pipe")))
    assert _exit(capsys, ["demo"]) == (141, [])
    monkeypatch.setattr(m, "_cmd_demo", _raise(SplitError("x")))
    monkeypatch.setenv("TIMM_SPLIT_DEBUG", "1")
    with pytest.raises(SplitError):
        main(["demo"])


def test_usage_errors_are_one_line(capsys):
    _one_line(capsys, ["compare", "test_resnet", "--split", "x"], "split factor")
    _one_line(capsys, ["nosuchcommand"], "invalid choice")


@pytest.mark.timeout(120)
def test_compare_keeps_the_rows_of_models_that_can_be_split(monkeypatch, capsys):
    """One unsplittable model in a glob: its row has the error as status, the others are printed, exit 1."""
    import json

    from timm_split.commands import compare

    real = compare.split

    def split(model, S, **kw):
        if type(model).__name__ == "VisionTransformer":
            raise SplitError("the rebuilt member does not run")
        return real(model, S, **kw)

    monkeypatch.setattr(compare, "split", split)
    rc, lines = _exit(capsys, ["compare", "test_resnet", "test_vit", "--split", "2", "--no-check", "--img-size",
                               "32"])
    assert rc == 1 and lines == ["timm-split compare: error: test_vit S=2: SplitError: the rebuilt member does not run"]
    main_rows = compare.compare_models(["test_resnet", "test_vit"], [2], 32, check=False)
    assert [(r["model"], r["split"], r["status"].split(":")[0]) for r in main_rows] == [
        ("test_resnet", 1, "ok"), ("test_resnet", 2, "ok"), ("test_vit", 1, "ok"), ("test_vit", 2, "SplitError")]
    json.dumps(main_rows)  # the JSON format takes error rows too
    assert "SplitError" in compare.format_rows(main_rows, "table") and compare.format_rows(main_rows, "csv")


# ---------------------------------------------------------------------------------------------------------------
# class 7: a pattern that matches nothing is an error; a flag that does nothing says so

@pytest.mark.parametrize("argv, needle", [
    (["--filter", "nomatch*"], "--filter 'nomatch*' matches no timm architecture"),
    (["--filter", "resnt18"], "did you mean: resnet18"),
    (["--filter", "resnet18", "--exclude", "nomatch*"], "--exclude 'nomatch*' matches no"),
    (["--filter", "resnet18", "--exclude", "resnet*"], "leaves none"),
    (["--tier", "default", "--filter", "vit_huge*"], "matches no architecture of --tier default"),
    (["--report", "REPORT"], "no --markdown was given"),
])
def test_sweep_selection_that_does_nothing_is_an_error(monkeypatch, capsys, tmp_path, argv, needle):
    from timm_split.commands import sweep

    def no_sweep(*args, **kwargs):
        raise AssertionError("swept an empty selection")

    monkeypatch.setattr(sweep, "run_sweep", no_sweep)
    report = tmp_path / "r.csv"
    _sweep_csv(report)
    argv = [str(report) if a == "REPORT" else a for a in argv]
    _one_line(capsys, ["sweep", *argv, "--out", str(tmp_path / "s.csv")], needle)


@pytest.mark.parametrize("argv, needle", [
    (["compare", "test_resnet", "--split", "1", "--by-module", "1"], "--by-module does nothing here"),
    (["compare", "test_resnet", "--split", "2", "--per-member", "--format", "json"], "--per-member does nothing"),
    (["sweep", "--filter", "resnet18", "--cpu-max-params", "1e6"], "--cpu-max-params does nothing here"),
])
def test_flags_that_do_nothing_warn(monkeypatch, caplog, capsys, tmp_path, argv, needle):
    from timm_split.commands import compare, sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: [])
    monkeypatch.setattr(compare, "compare_models", lambda *a, **k: [])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        assert _exit(capsys, argv)[0] == 0
    assert needle in caplog.text


@pytest.mark.parametrize("overrides, needle", [
    ({"amp_dtype": "bfloat16"}, "--amp-dtype does nothing"),
    ({"no_resume_opt": True}, "--no-resume-opt does nothing"),
    ({"model_ema_decay": 0.99}, "--model-ema-decay does nothing"),
    ({"mixup_prob": 0.5}, "--mixup-prob does nothing"),
    ({"recount": 3}, "--recount does nothing"),
    ({"clip_mode": "value"}, "--clip-mode does nothing"),
    ({"split": 2, "cot_weight": 0.0, "cot_mode": "kl"}, "--cot-mode does nothing"),
    ({"same_view": True}, "--same-view does nothing"),
    ({"decay_milestones": [10, 20]}, "--decay-milestones does nothing"),
    ({"no_aug": True, "hflip": 0.0}, "--hflip does nothing"),
    ({"lr": 0.1, "lr_base": 0.5}, "--lr-base does nothing"),
])
def test_train_flags_that_do_nothing_warn(caplog, overrides, needle):
    from timm_split.commands.train import train_args
    from timm_split.commands.train_checks import check_train_args

    with caplog.at_level(logging.WARNING, logger="timm_split"):
        check_train_args(train_args(model="test_resnet", **overrides))
    assert needle in caplog.text


def test_validate_flags_that_do_nothing_warn(checkpoint, monkeypatch, caplog, capsys):
    from timm_split.commands import validate

    monkeypatch.setattr(validate, "collect_member_logits", _fake_evaluate)
    with caplog.at_level(logging.WARNING, logger="timm_split"):
        assert _exit(capsys, _validate(checkpoint, "--amp-dtype", "float16"))[0] == 0
    assert "--amp-dtype does nothing" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# class 8: one audited folder scanner, the member views' contract

def _scan(root):
    from timm_split.training.data import create_eval_dataset

    ds, names, _ = create_eval_dataset("", str(root), "validation")
    return names, sorted((os.path.relpath(p, root), t) for p, t in ds.reader.samples)


def test_scanner_leaves_out_hidden_and_non_image_files_and_takes_any_case(tmp_path):
    _folder(tmp_path)
    _png(str(tmp_path / "validation" / "a" / ".ipynb_checkpoints" / "0-checkpoint.png"))  # a hidden folder
    _png(str(tmp_path / "validation" / ".hidden_class" / "0.png"))
    _png(str(tmp_path / "validation" / "a" / "._0.png"))  # macOS resource fork
    _png(str(tmp_path / "validation" / "b" / "UPPER.PNG"))
    (tmp_path / "validation" / "a" / "notes.txt").write_text("x")
    names, samples = _scan(tmp_path)
    assert names == ["a", "b"]
    assert samples == [("validation/a/0.png", 0), ("validation/a/1.png", 0), ("validation/b/0.png", 1),
                       ("validation/b/1.png", 1), ("validation/b/UPPER.PNG", 1)]


def test_scanner_nested_folders_belong_to_their_class(tmp_path):
    _folder(tmp_path)
    _png(str(tmp_path / "validation" / "a" / "x" / "n.png"))
    _png(str(tmp_path / "validation" / "b" / "x" / "n.png"))
    names, samples = _scan(tmp_path)
    assert names == ["a", "b"]  # timm named both nested folders' images class 'x'
    assert ("validation/a/x/n.png", 0) in samples and ("validation/b/x/n.png", 1) in samples
    _png(str(tmp_path / "elsewhere" / "z.png"))  # a symlinked class folder is followed
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "validation" / "c"))
    names, samples = _scan(tmp_path)
    assert names == ["a", "b", "c"] and ("validation/c/z.png", 2) in samples


@pytest.mark.parametrize("make, needle", [
    (lambda v: _png(str(v / "stray.png")), "in no class folder"),
    (lambda v: (v / "c").mkdir(), "hold no images"),
    (lambda v: os.symlink(str(v), str(v / "a" / "loop")), "a folder above it"),
    (lambda v: os.symlink(str(v / "missing.png"), str(v / "a" / "dangling.png")), "broken symlink"),
])
def test_scanner_refuses_what_it_cannot_label(tmp_path, make, needle):
    _folder(tmp_path)
    make(tmp_path / "validation")
    with pytest.raises(ValueError, match=needle):
        _scan(tmp_path)


def test_member_views_contract():
    from timm_split.training.data import MemberBatchAugment, MemberViews, collate_member_views

    pil = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="must be a tensor"):  # was a silent [S, H, W, C] uint8 tensor
        MemberViews(lambda x: x, 2)(pil)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        MemberViews(lambda x: torch.zeros(8, 8), 2)(None)
    with pytest.raises(ValueError, match="real-valued"):
        collate_member_views([(torch.zeros(2, 3, 4, 4, dtype=torch.bool), 0)])
    with pytest.raises(ValueError, match=r"\[S, C, H, W\]"):
        collate_member_views([(torch.zeros(2, 1, 3, 4, 4), 0)])
    with pytest.raises(ValueError, match=r"\[S, B, C, H, W\]"):
        MemberBatchAugment()(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="normalised float"):
        MemberBatchAugment(re_prob=1.0)(torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4))
    assert MemberViews(lambda x: np.zeros((3, 4, 4), np.float32), 2)(None).shape == (2, 3, 4, 4)


# ---------------------------------------------------------------------------------------------------------------
# the flag table: every flag of every command, values from and around its domain -> accepted, or exit 2 in one line

def _fake_evaluate(model, loader, *args, **kwargs):
    """``collect_member_logits`` without running the model: random logits of the right shape."""
    n = len(loader.dataset)
    k = model.num_classes
    return torch.randn(model.split_factor, n, k), torch.arange(n) % k


NUMBERS = ["0", "1", "2", "-1", "3", "1e3", "1.5", "nan", "inf", "-inf", "1e400", "", "abc", "0x10", " 3", "-0",
           "4294967296", "99999999999999999999"]
TEXT = ["", "x", "-", "nosuch", "/nonexistent/path", "a b", "*", "resnet18", "1", "é"]


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _values(action):
    """A strategy of command-line values for one option, drawn from and around its domain."""
    if action.choices:
        choices = [str(c) for c in action.choices]
        around = [c.upper() for c in choices] + [c + "x" for c in choices] + ["", "none"]
        one = st.sampled_from(choices + around)
    elif action.type in (int, float) or getattr(action.type, "__name__", "") in ("parse", "split_factor_arg",
                                                                                  "_seconds", "_params"):
        one = st.one_of(st.sampled_from(NUMBERS), st.integers(-10 ** 6, 10 ** 6).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr))
    else:
        one = st.sampled_from(TEXT + ["k=v", "drop_rate=0.1", "1=2"])
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        n = action.nargs if isinstance(action.nargs, int) else None
        return st.lists(one, min_size=n or 1, max_size=n or 3)
    if action.nargs == 0:
        return st.just([])
    if action.nargs == "?":
        return st.lists(one, max_size=1)
    return st.lists(one, min_size=1, max_size=1)


def _flags(cmd):
    skip = {"help", "checkpoint", "data_dir", "device", "workers", "output", "results_file", "out", "markdown",
            "plot", "threads", "idx_dir"}  # files and devices: drawn in the tests above and by the campaign
    return [a for a in _subparsers()[cmd]._actions if a.option_strings and a.dest not in skip]


BASE = {
    "compare": ["compare", "test_resnet", "--no-check"],
    "sweep": ["sweep", "--filter", "test_resnet"],
    "demo": ["demo"],
    "export-fashion-mnist": ["export-fashion-mnist", "OUT", "--idx-dir", "IDX"],
    "train": ["train", "--model", "test_resnet", "--device", "cpu", "-j", "0"],
    "validate": None,  # from the checkpoint fixture
}


@pytest.fixture
def stubs(monkeypatch, tmp_path, checkpoint):
    """The commands' work replaced by what is cheap (the checks before it stay real)."""
    import timm_split.commands.main as m
    from timm_split.commands import compare, sweep, train, validate
    from timm_split.commands.train_checks import check_train_args
    from timm_split.training import data

    monkeypatch.setattr(compare, "compare_models", lambda *a, **k: [])
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: [])
    monkeypatch.setattr(validate, "collect_member_logits", _fake_evaluate, raising=False)
    monkeypatch.setattr(data, "export_fashion_mnist", lambda *a, **k: {"train": 0, "validation": 0})
    monkeypatch.setattr(train, "train", lambda args, **k: (check_train_args(args), {"final": None})[1])

    def demo(args):  # its checks, without splitting resnet50
        from timm_split.commands.compare import resolve_models
        if resolve_models([args.model]) != [args.model]:
            raise ValueError("--model takes one timm model name")
        return 0
    monkeypatch.setattr(m, "_cmd_demo", demo)
    monkeypatch.chdir(tmp_path)
    os.makedirs("IDX", exist_ok=True)
    return {**BASE, "validate": _validate(checkpoint)}


COMMANDS = {"train": 25, "validate": 15, "compare": 15, "sweep": 15, "demo": 6, "export-fashion-mnist": 6}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_flag_table(stubs, capsys, cmd):
    """Every flag of ``cmd``, with values drawn from and around its domain: exit 0, or exit 2 with one line."""
    flags = _flags(cmd)

    scale = int(os.environ.get("FLAG_TABLE_SCALE", "1"))  # a longer search: FLAG_TABLE_SCALE=20

    @settings(max_examples=COMMANDS[cmd] * scale, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=scale == 1)
    @given(data=st.data())
    def check(data):
        action = data.draw(st.sampled_from(flags), label="flag")
        values = data.draw(_values(action), label="values")
        argv = stubs[cmd] + [action.option_strings[-1], *values]
        rc, lines = _exit(capsys, argv)
        assert rc in (0, 2), (argv, rc, lines)
        assert rc == 0 or (len(lines) == 1 and "Traceback" not in lines[0]), (argv, lines)

    check()
