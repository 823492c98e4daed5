"""A newcomer's walk through README.md on a fresh clone (issue 37, third round): the install check, the sweep
examples and their summaries, the zoo example, the plan-shape table's input size, export's EMA weights, compare's
CSV, validate's first error and the files the documented commands leave. Fast: meta models, fake sweep workers and a
tiny test_resnet only."""
import argparse
import csv
import io
import os
import re
import subprocess
import sys

import pytest
import torch

from timm_split.commands.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


# ------------------------------------------------------------- 1. a torchvision built for another torch: one line
TORCHVISION_ERROR = "operator torchvision::nms does not exist"


def _broken_torchvision():
    raise RuntimeError(TORCHVISION_ERROR)


def test_torchvision_for_another_torch_is_one_line_naming_both_and_the_fix(monkeypatch, capsys):
    from timm_split import environment
    from timm_split.environment import TorchvisionMismatchError, check_torchvision

    monkeypatch.setattr(environment, "_import_torchvision", _broken_torchvision)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    with pytest.raises(TorchvisionMismatchError) as e:  # a library import: an ImportError with the one line
        check_torchvision()
    msg = str(e.value)
    assert "\n" not in msg and TORCHVISION_ERROR in msg and f"torch {torch.__version__}" in msg
    assert re.search(r"torchvision \S+ does not load with torch", msg)
    assert "--index-url https://download.pytorch.org/whl/cpu" in msg and "pip install -e ." in msg
    assert 'python -c "import torchvision"' in msg

    monkeypatch.setattr(sys, "argv", ["/venv/bin/timm-split", "demo"])  # the command: the line alone, exit 1
    with pytest.raises(SystemExit) as e:
        check_torchvision()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"timm-split demo: error: {msg}"

    def other():
        raise RuntimeError("something else")
    monkeypatch.setattr(environment, "_import_torchvision", other)  # any other error is not ours to reword
    with pytest.raises(RuntimeError, match="something else"):
        check_torchvision()


def test_the_cli_funnel_rewords_the_torchvision_error(capsys):
    from timm_split.commands.common import run_command

    def demo(args):
        _broken_torchvision()

    with pytest.raises(SystemExit) as e:
        run_command("demo", demo, argparse.Namespace())
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("timm-split demo: error: torchvision ") and "does not load with torch" in err[0]
    assert "TIMM_SPLIT_DEBUG" not in err[0]  # not the generic "RuntimeError: ..." line


_SCRIPT = """
import sys
class Broken:  # importing torchvision fails as it does beside a torch it was not built for
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
sys.meta_path.insert(0, Broken())
sys.argv = ["/venv/bin/timm-split", "demo"]  # as the console script runs
from timm_split.commands.main import main
sys.exit(main())
"""


@pytest.mark.timeout(120)
def test_timm_split_demo_with_a_broken_torchvision_prints_one_line(tmp_path):
    """The real order: ``timm-split`` imports the package, which checks torchvision before timm imports it."""
    env = {k: v for k, v in os.environ.items() if k != "TIMM_SPLIT_DEBUG"}
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=110)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and p.stdout == "" and len(err) == 1, p.stderr
    assert err[0].startswith("timm-split demo: error: torchvision ") and "Traceback" not in p.stderr
    assert TORCHVISION_ERROR in err[0] and f"torch {torch.__version__}" in err[0]


def test_quick_start_says_how_to_check_the_pair_and_the_way_out():
    text = " ".join(_readme().split())
    start = text.index("**No NVIDIA GPU?**")
    para = text[start:text.index("With a GPU, skip that line.", start)]
    assert 'python -c "import torchvision"' in para
    assert "cannot be reached" in para and "new venv" in para and "skip that line" in para
    assert "pip install -e ." in para and "5.6 GB" in para and "runs on a CPU" in para


# -------------------------------------------------------------------- 2, 3, 4. sweep examples and their summaries
def _sweep_lines():
    block = re.search(r"### The zoo: `timm-split sweep`\n\n```bash\n(.*?)```", _readme(), flags=re.S).group(1)
    return [line.split("#")[0].split() for line in block.splitlines() if line.startswith("timm-split sweep")]


def _flag(argv, flag):
    i = argv.index(flag)
    values = []
    for v in argv[i + 1:]:
        if v.startswith("--"):
            break
        values.append(v.strip("'"))
    return values


@pytest.mark.timeout(120)
def test_the_readme_cpu_sweep_selects_models_under_the_cap():
    import timm

    from timm_split.commands.sweep import select

    (argv,) = [a for a in _sweep_lines() if "--device" in a]
    assert _flag(argv, "--device") == ["cpu"] and "--cpu-max-params" not in argv
    names = select(_flag(argv, "--filter"), [], int(_flag(argv, "--limit")[0]))
    sizes = []
    for name in names:
        with torch.device("meta"):
            sizes.append(sum(p.numel() for p in timm.create_model(name).parameters()))
    under = sum(s <= 30e6 for s in sizes)
    assert under >= len(names) // 2
    assert f"({under} of these {len(names)})" in _readme()


def test_each_readme_sweep_has_its_own_out_and_help_says_the_default():
    from timm_split.commands.sweep import add_args

    outs = [_flag(a, "--out")[0] for a in _sweep_lines() if "--report" not in a]
    assert len(outs) == 3 and len(set(outs)) == 3 and "sweep.csv" not in outs
    p = argparse.ArgumentParser()
    add_args(p)
    assert "default: sweep.csv" in " ".join(p.format_help().split())
    text = " ".join(_readme().split())
    assert "(default `sweep.csv` in the current folder)" in text


def test_zoo_example_says_it_resumes_the_committed_csv():
    text = " ".join(_readme().split())
    assert "does nothing on a fresh clone: the committed `docs/zoo.csv` is complete" in text
    assert "pass another `--out`" in text


def _row(arch, S, status="ok", reason="", cpu_checked=False):
    return dict(arch=arch, module="m", split=str(S), status=status, reason=reason, cpu_checked=str(cpu_checked))


def test_cpu_sweep_that_checked_nothing_warns_naming_the_cap():
    from timm_split.commands.sweep import cpu_check_warning, summary_line

    over = [_row(f"vit_{i}", 2, reason="cpu check skipped: 86.6M params > --cpu-max-params 30M") for i in range(3)]
    line = summary_line(over, "x.csv")
    assert line.startswith("3 rows in x.csv: ok 3") and "run on 0, skipped on 3" in line
    warning = cpu_check_warning(over, cpu_max_params=30e6)
    assert warning.startswith("WARNING: --device cpu") and "ran on 0 of the 3 rows" in warning
    assert "3 ok row(s) over --cpu-max-params 30M" in warning and "\n" not in warning
    assert cpu_check_warning(over + [_row("vit_tiny", 2, cpu_checked=True)]) is None  # one check ran
    assert cpu_check_warning([]) is None


def test_summary_counts_only_this_sweeps_rows_and_names_the_others():
    from timm_split.commands.sweep import cpu_check_warning, summary_line

    rows = [_row("a", 2, cpu_checked=True), _row("a", 4, cpu_checked=True), _row("b", 2), _row("c", 2, "timeout")]
    line = summary_line(rows, "s.csv", selected={("b", 2)}, earlier={("a", 2), ("a", 4), ("c", 2)})
    assert line == "1 rows of this sweep in s.csv: ok 1; 3 rows from earlier runs in this file (other models or " \
                   "splits) not counted"
    line = summary_line(rows, "s.csv", selected={("b", 2), ("c", 2)}, earlier={("a", 2), ("a", 4), ("c", 2)})
    assert line.startswith("2 rows of this sweep in s.csv: ok 1, timeout 1;") and "CPU check" not in line
    assert "1 of them resumed from earlier runs in this file, not run again" in line
    assert "2 rows from earlier runs in this file" in line
    warning = cpu_check_warning(rows, selected={("b", 2), ("c", 2)}, earlier={("c", 2)})
    assert "ran on 0 of the 2 rows" in warning and "1 row(s) resumed" in warning and "1 row(s) not ok" in warning


def _fake_sweep_one(arch, splits, device="meta", cpu_max_params=30e6, cpu_img_size=64):
    return [dict(arch=arch, module="m", split=S, status="ok", reason="", cpu_checked=device == "cpu", seconds=0.1)
            for S in splits]


@pytest.mark.timeout(120)
def test_a_second_sweep_into_the_same_csv_reports_its_own_rows(tmp_path, monkeypatch, capsys):
    from timm_split.commands import sweep

    monkeypatch.setattr(sweep, "sweep_one", _fake_sweep_one)  # the forked workers inherit it
    out = str(tmp_path / "sweep.csv")

    def run(*argv):
        assert main(["sweep", "--split", "2", "--out", out, *argv]) == 0
        o, e = capsys.readouterr()
        return o.strip().splitlines()[-1], [line for line in e.splitlines() if "--device cpu asked" in line]

    line, warn = run("--filter", "resnet18", "--device", "cpu")
    assert line == f"1 rows of this sweep in {out}: ok 1; CPU check: run on 1, skipped on 0 ok row(s) over " \
                   "--cpu-max-params" and not warn
    line, warn = run("--filter", "resnet34")  # another model on meta: the first sweep's check is not counted
    assert line == f"1 rows of this sweep in {out}: ok 1; 1 rows from earlier runs in this file (other models or " \
                   "splits) not counted" and not warn
    line, (warn,) = run("--filter", "resnet34", "--device", "cpu")  # resumed: nothing runs, and it says so
    assert "1 of them resumed from earlier runs in this file, not run again" in line
    assert "ran on 0 of the 1 rows (1 row(s) resumed from an earlier run in this file)" in warn
    with open(out, newline="") as f:
        assert [(r["arch"], r["cpu_checked"]) for r in csv.DictReader(f)] == [("resnet18", "True"),
                                                                              ("resnet34", "False")]


# ------------------------------------------------------------------------------ 5. the plan-shape table's input size
def test_plan_shape_table_states_each_rows_input_size():
    from conftest import ACCEPTANCE

    with open(os.path.join(ROOT, "docs", "plan_shape.md")) as f:
        md = f.read()
    assert "| model | S | px |" in md
    rows = re.findall(r"^\| ([\w:]+) \| ([24]) \| (\d+) \|", md, flags=re.M)
    assert len(rows) == 48
    for model, _, px in rows:
        assert int(px) == (28 if model.startswith("science:") else ACCEPTANCE[model][1]), model
    with open(os.path.join(ROOT, "docs", "plan_shape.csv"), newline="") as f:
        assert [(r["model"], r["split"], r["img_size"]) for r in csv.DictReader(f)] == rows
    assert re.search(r"\| resnet50 \| 4 \| 64 \| .* \| 0\.9981 \|", md)  # the README's 0.9932 is at 224 px


# ------------------------------------------------------------------------------------- 6. export's EMA weights
@pytest.mark.timeout(300)
def test_export_says_which_weights_and_use_ema_exports_the_ema(tmp_path, capsys):
    import copy

    import timm

    import timm_split
    from timm_split.commands.export import weights_line

    ens = timm_split.split(timm.create_model("test_resnet", num_classes=10), 2).eval()
    ema = copy.deepcopy(ens)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    ckpt = str(tmp_path / "model_best.safetensors")
    timm_split.save_checkpoint(ens, ckpt, model_ema=ema)
    x = torch.randn(1, 3, 32, 32)
    for flags, weights, want in (([], "raw", ens), (["--use-ema"], "EMA", ema)):
        out = tmp_path / f"{weights}.pt2"
        rc = main(["export", "--checkpoint", ckpt, "--model", "test_resnet", "--split", "2", "--num-classes", "10",
                   "--img-size", "32", "--output", str(out), *flags])
        text = capsys.readouterr().out
        assert rc == 0, text
        assert f"weights: {weights} weights of {ckpt}" in text
        assert ("pass --use-ema to export those" in text) == (weights == "raw")
        with open(out, "rb") as f:
            prog = torch.export.load(f).module()
        with torch.no_grad():
            assert torch.allclose(prog(x), want(x), atol=1e-4)
    plain = str(tmp_path / "plain.safetensors")
    timm_split.save_checkpoint(ens, plain)
    assert weights_line(plain, False) == f"weights: raw weights of {plain} (it holds no EMA weights)"
    assert weights_line(None, False) == "weights: freshly initialised (no --checkpoint)"
    with open(os.path.join(ROOT, "docs", "export.md")) as f:
        doc = f.read()
    assert "timm-split export --checkpoint runs/r18-s2/model_best.safetensors --use-ema" in doc


# ---------------------------------------------------------------------------------------- 7. compare's CSV and JSON
def _fake_rows(names, splits, img_size=None, **kwargs):
    rows = []
    for S in [1, 2]:
        rows.append(dict(model="resnet18", split=S, img_size=64, params=1e6, gmacs=1.0, gmacs_mac_only=1.0,
                         params_ratio=1.0, gmacs_ratio=1.0, width_factor=S ** -0.5,
                         members=[{"params": 1e6 / S, "gmacs": 1.0 / S}] * S, counter_check=None, meta=True,
                         status="ok"))
    return rows


def test_compare_csv_has_newline_rows_and_no_blank_line_after_the_last(monkeypatch, capsys):
    from timm_split.commands import compare

    monkeypatch.setattr(compare, "compare_models", _fake_rows)
    assert main(["compare", "resnet18", "--split", "2", "--format", "csv", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and out.endswith("\n") and not out.endswith("\n\n")
    lines = out.split("\n")[:-1]
    assert len(lines) == 3 and lines[0].startswith("model,split,img_size") and all(lines)
    assert [r["split"] for r in csv.DictReader(io.StringIO(out))] == ["1", "2"]


def test_readme_json_key_table_lists_every_key():
    from timm_split.commands.compare import error_row

    text = _readme()
    table = text[text.index("`--format json` prints a list"):]
    table = table[:table.index("\n\n", table.index("| key |"))]
    keys = set(re.findall(r"`(\w+)`", "\n".join(line.split("|")[1] for line in table.splitlines()
                                                 if line.startswith("| `"))))
    assert keys == set(error_row("resnet18", 1, None, ValueError("x")))  # every key of a row, status included


# ------------------------------------------------------------------- 8. validate before any training: the real cause
def test_validate_in_an_empty_folder_names_the_missing_checkpoint_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["validate", "--checkpoint", "runs/r18-s2/model_best.safetensors", "--data-dir", "fmnist", "-j", "2",
               "--use-ema", "--results-file", "runs/r18-s2/validate.csv"])
    err = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith(("WARNING", "INFO"))]
    assert rc == 2 and len(err) == 1, err
    assert "no checkpoint at runs/r18-s2/model_best.safetensors" in err[0] and "--results-file" not in err[0]
    (tmp_path / "w.safetensors").write_bytes(b"")  # a checkpoint there: the output's folder is the next error
    rc = main(["validate", "--checkpoint", "w.safetensors", "--results-file", "runs/validate.csv"])
    err = capsys.readouterr().err
    assert rc == 2 and "--results-file" in err and "does not exist" in err
    rc = main(["validate", "--checkpoint", "runs/none.safetensors", "--batch-size", "0"])  # a bad value: first
    assert rc == 2 and "--batch-size must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- 9. what the documented commands write
def test_gitignore_covers_what_the_readme_commands_write_and_no_tracked_file():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)

    written = ["fmnist/train/0_t_shirt_top/0.png", "out.csv", "cost.png", "sweep.csv", "sweep_vit_cpu.csv",
               "sweep_tier.csv", "zoo_new.csv", "r18s2.onnx", "model.onnx", "r18s2.pt2", "runs/r18-s2/last.safetensors",
               "split.safetensors"]
    ignored = git("check-ignore", *written).stdout.split()
    assert sorted(ignored) == sorted(written)
    assert not git("check-ignore", "docs/zoo.csv", "docs/plan_shape.csv", "README.md").stdout.strip()
    assert git("ls-files", "-ci", "--exclude-standard").stdout == ""
